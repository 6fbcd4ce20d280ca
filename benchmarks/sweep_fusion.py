"""64 classic-example models, fused (`gpupar sweep`) against a sequential loop of single trainings.

Both run in this process, interleaved, REPEATS times each; the ratio of medians is printed,
with the largest relative difference between the two sides' final losses (they train the
same models, so it should be ~1e-6). Classic example: SimpleNN 10-50-1, 1000 synthetic
samples, full-batch Adam, lr 0.01, 100 epochs; the models differ by init seed (0..63).
Targets: fused / sequential speed-up >= 5x on a 2-core CPU, >= 50x on a GPU.

    python benchmarks/sweep_fusion.py [--models 64] [--repeats 3] [--device auto]
"""

import argparse
import contextlib
import io
import statistics
import time

import torch

import gpupar
from gpupar.config import Config
from gpupar.data import synthetic_regression
from gpupar.devices import describe, pick_device
from gpupar.models import build_model
from gpupar.sweep import grid, run_sweep
from gpupar.topology import Topology


def config(device) -> Config:
    cfg = Config()
    cfg.train.device, cfg.train.progress = str(device), False
    return cfg


def sequential(members, X, y, device) -> list[float]:
    """What a user does without fusion: one gpupar.train per model, one after another."""
    finals = []
    for m in members:
        cfg = config(device)
        cfg.optim.lr = m.lr
        model = build_model(cfg.model, X.shape[1], y.shape[1], m.seed)
        with contextlib.redirect_stdout(io.StringIO()):
            finals.append(gpupar.train(model, (X, y), config=cfg).history.final_loss)
    return finals


def fused(members, X, y, device) -> list[float]:
    sweep = run_sweep(config(device), members, Topology.single(device), log=lambda _: None)
    return [r.train_loss for r in sorted(sweep.results, key=lambda r: r.member.index)]


def timed(fn, *args):
    device = args[-1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    X, y = synthetic_regression(seed=42)  # the data of the classic example (train.seed 42)
    members = grid(list(range(args.models)), [0.01], [50])
    timed(fused, members[:4], X, y, device), timed(sequential, members[:2], X, y, device)  # warm-up
    seq_times, fused_times, worst = [], [], 0.0
    for _ in range(args.repeats):
        ts, seq_losses = timed(sequential, members, X, y, device)
        tf, fused_losses = timed(fused, members, X, y, device)
        seq_times.append(ts)
        fused_times.append(tf)
        worst = max([worst] + [abs(a - b) / abs(b) for a, b in zip(fused_losses, seq_losses)])
    s, f = statistics.median(seq_times), statistics.median(fused_times)
    print(f"device: {describe(device)}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"{args.models} models x 100 epochs, median of {args.repeats}")
    print(f"sequential gpupar.train: {s:.3f} s   fused gpupar sweep: {f:.3f} s")
    print(f"speed-up fused / sequential = {s / f:.2f}x  (target >= 5x on CPU, >= 50x on GPU)")
    print(f"largest relative difference of final losses: {worst:.2e}")


if __name__ == "__main__":
    main()
