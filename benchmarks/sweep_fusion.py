"""64 classic-example models, fused (`gpupar sweep`) against a sequential loop of single trainings.

Classic example: SimpleNN 10-50-1, 1000 synthetic samples, full-batch Adam, lr 0.01, 100
epochs; the models differ by init seed (0..63). Targets: fused / sequential speed-up >= 5x
on a 2-core CPU, >= 50x on a GPU.

Why the protocol: the two sides react differently to a busy machine (64 short trainings
lose more to preemption than one long fused run, so load inflates the ratio), so

* both sides run in this process with the same pinned thread count, interleaved (the
  order alternates every repeat), and the min and median of each side are reported with
  the ratio of medians and of mins;
* the 1-minute load average is read before and after; a start above --max-load (0.5)
  marks the figure "not valid" (``--strict`` refuses to measure instead);
* the final losses of the two sides must agree (~1e-6 relative: same models, same data).

``--profile`` adds a torch.profiler table of the fused step and compares its time with the
compute floor (3 x forward FLOPs of 64 models at the measured sgemm rate).

    python benchmarks/sweep_fusion.py [--models 64] [--repeats 5] [--threads N] [--profile]
"""

import argparse
import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import time

import torch

import gpupar
from gpupar.config import Config
from gpupar.data import synthetic_regression
from gpupar.devices import describe, pick_device
from gpupar.sweep.fused import FusedOptimizer, fuse, train_step
from gpupar.models import build_model
from gpupar.sweep import grid, run_sweep
from gpupar.topology import Topology

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_")


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


def timed(fn, members, X, y, device, threads: int) -> tuple[float, list[float]]:
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"thread count changed to {torch.get_num_threads()} (pinned to {threads})")
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(members, X, y, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sgemm_gflops(device, size: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul rate now, with this process's threads: the ceiling for the floor."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * size ** 3 / best / 1e9


def profile(n_models: int, X, y, device, peak: float) -> None:
    """Where the fused step's time goes: torch.profiler's top ops, and the step against the floor."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cfg = config(device)
    models = [build_model(cfg.model, X.shape[1], y.shape[1], s) for s in range(n_models)]
    f = fuse(models, device)
    opt = FusedOptimizer(f, [cfg.optim.lr] * n_models, cfg)
    X, y = X.to(device), y.to(device)

    def step():
        train_step(f, X, y, "mse")
        opt.step()
        opt.zero_grad()

    for _ in range(5):
        step()
    per_step = []
    for _ in range(10):  # 10 windows of 10 steps, without the profiler's overhead
        start = time.perf_counter()
        for _ in range(10):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step.append((time.perf_counter() - start) / 10)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(10):
            step()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=12))
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    # 3 x forward FLOPs (forward, input and weight gradients); a forward is 2 n M (in H + H out).
    weights = sum(m.in_features * m.out_features for m in models[0].modules() if isinstance(m, torch.nn.Linear))
    flops = 3 * 2 * len(X) * n_models * weights
    ms, ms_min, floor = statistics.median(per_step) * 1e3, min(per_step) * 1e3, flops / (peak * 1e9) * 1e3
    print(f"profile: fused step (train_step + Adam) of {n_models} models: min {ms_min:.2f} ms, median {ms:.2f} ms; "
          f"floor {flops / 1e9:.3f} GFLOP at {peak:.0f} GFLOP/s = {floor:.2f} ms (min step = {ms_min / floor:.1f}x "
          f"the floor, {flops / (ms_min * 1e6):.0f} GFLOP/s); matmuls {100 * matmul / max(total, 1):.0f}% of the "
          f"profiled op time, the rest elementwise passes, reductions and dispatch")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-load", type=float, default=0.5, help="1-minute load average above which "
                        "the figure is marked not valid")
    parser.add_argument("--strict", action="store_true", help="refuse to measure on a machine that is not quiet")
    parser.add_argument("--profile", action="store_true", help="print the fused step's top ops and its floor")
    parser.add_argument("--peak-gflops", type=float, default=None, help="sgemm rate for the floor; "
                        "default: measured now (a quiet 2-core AMD EPYC gives about 163)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load_start = os.getloadavg()
    quiet = load_start[0] <= args.max_load
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    if not quiet:
        print(f"WARNING: machine not quiet: figure not valid (1-minute load {load_start[0]:.2f} > {args.max_load})")
        if args.strict:
            sys.exit(3)
    X, y = synthetic_regression(seed=42)  # the data of the classic example (train.seed 42)
    members = grid(list(range(args.models)), [0.01], [50])
    timed(fused, members[:4], X, y, device, args.threads)  # warm-up: first calls, allocator, kernels
    timed(sequential, members[:2], X, y, device, args.threads)
    seq_times, fused_times, worst = [], [], 0.0
    for i in range(args.repeats):
        sides = [(sequential, seq_times), (fused, fused_times)]
        losses = []
        for fn, times in sides if i % 2 == 0 else sides[::-1]:  # alternate the order: drift cancels
            t, out = timed(fn, members, X, y, device, args.threads)
            times.append(t)
            losses.append(out)
        seq_losses, fused_losses = losses if i % 2 == 0 else losses[::-1]
        worst = max([worst] + [abs(a - b) / abs(b) for a, b in zip(fused_losses, seq_losses)])
    load_end = os.getloadavg()
    if load_end[0] > args.max_load and quiet:
        quiet = False
        print(f"WARNING: machine not quiet: figure not valid (1-minute load rose to {load_end[0]:.2f})")
    s_min, s_med = min(seq_times), statistics.median(seq_times)
    f_min, f_med = min(fused_times), statistics.median(fused_times)
    validity = "valid (quiet)" if quiet else "UNDER LOAD, NOT VALID"
    print(f"device: {describe(device)} ({cpu_model()}, {os.cpu_count()} cores)  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()} (both sides)")
    print(f"{args.models} models x 100 epochs, {args.repeats} interleaved repeats per side")
    print(f"sequential gpupar.train: min {s_min:.3f} s  median {s_med:.3f} s")
    print(f"fused gpupar sweep:      min {f_min:.3f} s  median {f_med:.3f} s")
    print(f"speed-up fused / sequential: {s_med / f_med:.2f}x (medians), {s_min / f_min:.2f}x (mins)  "
          f"(target >= 5x on CPU, >= 50x on GPU)")
    print(f"largest relative difference of final losses: {worst:.2e}")
    print(f"load average: start {load_start[0]:.2f}, end {load_end[0]:.2f}: {validity}")
    if worst > 1e-5:
        sys.exit(f"error: fused and sequential final losses differ by {worst:.1e} relative (expected ~1e-6)")
    print("markdown row (BENCHMARKS.md):")
    print(f"| {datetime.datetime.now():%Y-%m-%d %H:%M} | {cpu_model()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''} | {load_start[0]:.2f} → {load_end[0]:.2f} | "
          f"{s_min:.2f} / {s_med:.2f} s | {f_min:.2f} / {f_med:.2f} s | **{s_med / f_med:.2f}×** "
          f"({s_min / f_min:.2f}×) | {worst:.1e} | {validity} |")
    if args.profile:
        peak = args.peak_gflops or sgemm_gflops(device)
        print(f"sgemm rate {'given' if args.peak_gflops else 'measured now'}: {peak:.0f} GFLOP/s")
        profile(args.models, X, y, device, peak)


if __name__ == "__main__":
    main()
