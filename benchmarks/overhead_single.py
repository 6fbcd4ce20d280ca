"""gpupar's single-device training of the classic example against the plain PyTorch loop.

Both run in this process, interleaved, REPEATS times each; the ratio of medians is printed.
Target: gpupar / plain <= 1.02 (no framework tax).

    python benchmarks/overhead_single.py [--repeats 21] [--device auto]
"""

import argparse
import contextlib
import io
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


def with_gpupar(X, y, device):
    torch.manual_seed(42)
    cfg = Config()
    cfg.train.device, cfg.train.progress = str(device), False
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
    args = parser.parse_args()
    device = pick_device(args.device)
    X, y = synthetic_regression()
    for _ in range(3):  # warm-up: allocator, kernels, lazy imports
        timed(plain_loop, X, y, device), timed(with_gpupar, X, y, device)
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(timed(plain_loop, X, y, device))
        ours.append(timed(with_gpupar, X, y, device))
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"plain PyTorch loop: median {p * 1e3:.2f} ms per 100-epoch run")
    print(f"gpupar.train:       median {o * 1e3:.2f} ms per 100-epoch run")
    print(f"ratio gpupar / plain = {o / p:.3f}  (target <= 1.02)")


if __name__ == "__main__":
    main()
