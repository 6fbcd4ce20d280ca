"""gpupar's single-device training of the classic example against the plain PyTorch loop.

Both run in this process, interleaved (the order alternates every repeat, so drift cancels),
REPEATS times each, on the same thread count; min and median of each side and their ratios
are printed, with the load average at start and end and a paste-ready BENCHMARKS.md row.
Target: gpupar / plain <= 1.00 (no framework tax). ``--cuda-graphs`` / ``--compile`` time
gpupar with those flags (the plain loop stays plain).

    python benchmarks/overhead_single.py [--repeats 31] [--device auto] [--threads N] [--cuda-graphs]
"""

import argparse
import contextlib
import io
import os
import statistics
import time

import torch
from torch import nn

import gpupar
from gpupar.config import Config
from gpupar.data import synthetic_regression
from gpupar.devices import pick_device


def plain_loop(X, y, device):
    """The ~40-line notebook version: .to(device), forward, loss, zero_grad, backward, step."""
    torch.manual_seed(42)
    model = gpupar.SimpleNN().to(device)
    X, y = X.to(device), y.to(device)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(100):
        outputs = model(X)
        loss = criterion(outputs, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 20 == 0:
            print(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")
    return model


FLAGS = {"compile": False, "cuda_graphs": False}


def with_gpupar(X, y, device):
    torch.manual_seed(42)
    cfg = Config()
    cfg.train.device, cfg.train.progress = str(device), False
    cfg.train.compile, cfg.train.cuda_graphs = FLAGS["compile"], FLAGS["cuda_graphs"]
    return gpupar.train(gpupar.SimpleNN(), (X, y), config=cfg).model


def timed(fn, *args):
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        if args[-1].type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if args[-1].type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    FLAGS.update(compile=args.compile, cuda_graphs=args.cuda_graphs)
    device = pick_device(args.device)
    X, y = synthetic_regression()
    load_start = os.getloadavg()
    for _ in range(3):  # warm-up: allocator, kernels, lazy imports (and compilation)
        timed(plain_loop, X, y, device), timed(with_gpupar, X, y, device)
    plain, ours = [], []
    for i in range(args.repeats):
        sides = [(plain_loop, plain), (with_gpupar, ours)]
        for fn, times in sides if i % 2 == 0 else sides[::-1]:
            times.append(timed(fn, X, y, device))
    load = f"{load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    p, o = statistics.median(plain), statistics.median(ours)
    flags = " ".join(f"--{k.replace('_', '-')}" for k, v in FLAGS.items() if v)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  {flags}")
    print(f"plain PyTorch loop: min {min(plain) * 1e3:.2f} ms  median {p * 1e3:.2f} ms per 100-epoch run")
    print(f"gpupar.train:       min {min(ours) * 1e3:.2f} ms  median {o * 1e3:.2f} ms per 100-epoch run")
    print(f"ratio gpupar / plain = {o / p:.3f} (medians), {min(ours) / min(plain):.3f} (mins)  (target <= 1.00)")
    print(f"load average (1 min) {load}")
    print("| command | plain min / median (ms) | gpupar min / median (ms) | ratio (medians) | ratio (mins) | load |")
    print(f"| `python benchmarks/overhead_single.py --repeats {args.repeats} --threads {args.threads}"
          f"{' ' + flags if flags else ''}` | {min(plain) * 1e3:.1f} / {p * 1e3:.1f} | {min(ours) * 1e3:.1f} / "
          f"{o * 1e3:.1f} | {o / p:.3f} | {min(ours) / min(plain):.3f} | {load} |")


if __name__ == "__main__":
    main()
