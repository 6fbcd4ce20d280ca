"""Pipeline bubble and activation memory: GPipe vs 1F1B, measured against theory.

Usage: python benchmarks/pipeline_bubble.py [--pp 2] [--microbatches 2,4,8,16] [--hidden 512]

Starts ``--pp`` ranks (gloo on CPU, NCCL on GPUs), splits an MLP of 4 x pp equal Linear
layers with gpupar's splitter, and runs PyTorch's ScheduleGPipe and Schedule1F1B at several
micro-batch counts M. The micro-batch size stays fixed, so each stage's work per micro-batch
is the same at every M and the theory applies:

- bubble: a stage is busy (M forwards + M backwards) and idle the rest of the step; the
  measured fraction is idle / wall time, with busy time timed around each stage's
  forward_one_chunk / backward_one_chunk. Theory (GPipe and 1F1B alike): (p-1)/(M+p-1).
- activation memory: the peak number of micro-batches whose activations a stage holds
  (forwards done minus backwards done), times the bytes autograd saves for one
  micro-batch (measured with saved_tensors_hooks). Theory: M for GPipe, p - stage for 1F1B.

Communication counts as idle time here, so the measured bubble is at least the theory.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from gpupar.config import ParallelConfig
from gpupar.parallel.pipeline import split_model


def instrument(stage: PipelineStage, log: dict) -> None:
    """Time every forward and backward chunk and track micro-batches in flight."""
    def timed(fn, kind):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            log["busy"] += time.perf_counter() - start
            log["in_flight"] += 1 if kind == "fwd" else -1
            log["peak"] = max(log["peak"], log["in_flight"])
            return out
        return run

    stage.forward_one_chunk = timed(stage.forward_one_chunk, "fwd")
    stage.backward_one_chunk = timed(stage.backward_one_chunk, "bwd")


def saved_bytes_per_microbatch(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward of ``module`` on ``x``."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_())
    return total


def worker(rank: int, pp: int, port: int, args) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=pp, timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    layers = [m for _ in range(4 * pp) for m in (nn.Linear(args.hidden, args.hidden), nn.ReLU())]
    model = nn.Sequential(*layers)
    (_, module), = split_model(model, pp, rank, ParallelConfig(pp=pp, schedule="1f1b"))
    module = module.to(device)
    mb = args.microbatch_size
    act_bytes = saved_bytes_per_microbatch(module, torch.randn(mb, args.hidden, device=device))
    rows = []
    for name, cls in (("GPipe", ScheduleGPipe), ("1F1B", Schedule1F1B)):
        for m in args.microbatches:
            stage = PipelineStage(module, rank, pp, device)
            log = {"busy": 0.0, "in_flight": 0, "peak": 0}
            instrument(stage, log)
            schedule = cls(stage, m, loss_fn=lambda out, y: ((out - y) ** 2).mean())
            x = torch.randn(m * mb, args.hidden, device=device)
            y = torch.randn(m * mb, args.hidden, device=device)
            walls = []
            for step in range(args.warmup + args.steps):
                log["busy"], log["peak"] = 0.0, 0
                dist.barrier()
                start = time.perf_counter()
                schedule.step(*((x,) if rank == 0 else ()), **({"target": y} if rank == pp - 1 else {}))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
                if step >= args.warmup:
                    walls.append((wall, log["busy"], log["peak"]))
                module.zero_grad(set_to_none=True)
            wall = sum(w for w, _, _ in walls) / len(walls)
            busy = sum(b for _, b, _ in walls) / len(walls)
            rows.append((name, m, rank, wall, 1 - busy / wall, (pp - 1) / (m + pp - 1), walls[-1][2], act_bytes))
    everyone = [None] * pp
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        report(everyone, pp)
    dist.destroy_process_group()


def report(everyone: list, pp: int) -> None:
    print(f"bubble fraction (idle / wall), p = {pp}; per-stage values are the mean over stages")
    print("| schedule | M | wall ms/step | measured bubble | theory (p-1)/(M+p-1) | peak activations per stage (MiB) |")
    print("|---|---|---|---|---|---|")
    for i in range(len(everyone[0])):
        per_stage = [rows[i] for rows in everyone]
        name, m = per_stage[0][0], per_stage[0][1]
        wall = max(r[3] for r in per_stage) * 1e3
        bubble = sum(r[4] for r in per_stage) / pp
        peaks = " / ".join(f"{r[6]} mb = {r[6] * r[7] / 2**20:.1f}" for r in per_stage)
        print(f"| {name} | {m} | {wall:.1f} | {bubble:.3f} | {per_stage[0][5]:.3f} | {peaks} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", default="2,4,8,16")
    parser.add_argument("--microbatch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    args.microbatches = [int(m) for m in args.microbatches.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.pp, port, args), nprocs=args.pp, join=True)


if __name__ == "__main__":
    main()
