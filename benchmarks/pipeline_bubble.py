"""Pipeline bubble and activation memory of every schedule, measured against theory.

Usage: PYTHONPATH=. python benchmarks/pipeline_bubble.py [--pp 2] [--microbatches 2,4,8,16] [--hidden 512]
       [--repeats 5] [--schedules gpipe,1f1b,interleaved-1f1b,interleaved-zb,zbv,dualpipev]

Starts ``--pp`` ranks (gloo on CPU, NCCL on GPUs), splits an MLP of 4 x pp equal Linear
layers with gpupar's splitter (one stage per rank, or 2 per rank for the interleaved and
V-shaped schedules: the same layers per rank either way), and runs PyTorch's schedules at
several micro-batch counts M. The micro-batch size stays fixed, so a rank's work per
micro-batch is the same at every M and for every schedule, and the theory applies
(gpupar/plan/schedules.py states it: bubble and peak micro-batches held per rank).

- bubble: a rank is busy inside its stages' forward / backward / weight-backward chunks and
  idle the rest of the step; measured as idle / wall (communication counts as idle, so
  the measurement is at least the theory).
- activation memory: the peak, over the step, of the bytes autograd saved for the
  micro-batches a rank's stages hold (from a chunk's forward until its backward frees them:
  the full backward, or the weight backward of the zero-bubble schedules), measured per
  stage with saved_tensors_hooks; the theory column is in micro-batches of the rank's layers.

Measurements are interleaved: each repeat runs one step of every (schedule, M) in turn, so
load that drifts during the run touches them all alike; the table gives the min and median
over repeats, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import (ScheduleDualPipeV, ScheduleInterleavedZeroBubble,
                                                    ScheduleZBVZeroBubble)

from gpupar.config import ParallelConfig
from gpupar.parallel.pipeline import MULTI_STAGE, layer_units, split_model, stage_owner
from gpupar.plan.schedules import bubble_fraction, peak_microbatches

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
             "interleaved-zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble,
             "dualpipev": ScheduleDualPipeV}


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


def instrument(stage: PipelineStage, saved: int, log: dict) -> None:
    """Time every chunk of ``stage`` and track the bytes its micro-batches hold."""
    def timed(fn, held):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            log["busy"] += time.perf_counter() - start
            log["held"] += held(kwargs)
            log["peak"] = max(log["peak"], log["held"])
            return out
        return run

    stage.forward_one_chunk = timed(stage.forward_one_chunk, lambda kw: saved)
    # A split backward (zero-bubble) frees the micro-batch's saved tensors at its weight part.
    stage.backward_one_chunk = timed(stage.backward_one_chunk,
                                     lambda kw: -saved if kw.get("full_backward", True) else 0)
    stage.backward_weight_one_chunk = timed(stage.backward_weight_one_chunk, lambda kw: -saved)


def build(name: str, m: int, modules: list, pp: int, device, saved: list[int], log: dict):
    stages = []
    for s, module in modules:
        stage = PipelineStage(module, s, len(modules) * pp, device)
        instrument(stage, saved[len(stages)], log)
        stages.append(stage)
    loss = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    return SCHEDULES[name](stages if name in MULTI_STAGE else stages[0], m, loss_fn=loss)


def worker(rank: int, pp: int, port: int, args) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=pp, timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4 * pp) for m in (nn.Linear(args.hidden, args.hidden), nn.ReLU())])
    mb = args.microbatch_size
    configs = []  # (schedule, M, its runner, this rank's log, first/last stage here)
    for name in args.schedules:
        options = ParallelConfig(pp=pp, schedule=name)
        modules = [(s, m.to(device)) for s, m in split_model(model, layer_units(model), pp, rank, options)]
        saved = [saved_bytes_per_microbatch(m, torch.randn(mb, args.hidden, device=device)) for _, m in modules]
        n_stages = len(modules) * pp
        first, last = stage_owner(0, pp, name) == rank, stage_owner(n_stages - 1, pp, name) == rank
        for m in args.microbatches:
            if name == "dualpipev" and m < n_stages:  # torch's DualPipeV needs M >= its stages
                continue
            log = {"busy": 0.0, "held": 0, "peak": 0}
            configs.append((name, m, build(name, m, modules, pp, device, saved, log), log, first, last,
                            sum(saved), [module for _, module in modules]))
    samples = {i: [] for i in range(len(configs))}
    for repeat in range(args.warmup + args.repeats):
        for i, (name, m, schedule, log, first, last, _, modules) in enumerate(configs):
            x = torch.randn(m * mb, args.hidden, device=device)
            y = torch.randn(m * mb, args.hidden, device=device)
            log.update(busy=0.0, held=0, peak=0)
            dist.barrier()
            start = time.perf_counter()
            schedule.step(*((x,) if first else ()), **({"target": y} if last else {}))
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            if repeat >= args.warmup:
                samples[i].append((wall, log["busy"], log["peak"]))
            for module in modules:
                module.zero_grad(set_to_none=True)
    rows = [(c[0], c[1], rank, samples[i], c[6]) for i, c in enumerate(configs)]
    everyone = [None] * pp
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        report(everyone, pp, args)
    dist.destroy_process_group()


def report(everyone: list, pp: int, args) -> None:
    load = os.getloadavg()[0]
    print(f"p = {pp}, micro-batch {args.microbatch_size} x {args.hidden}, {args.repeats} interleaved repeats "
          f"(min / median); load average {args.load_before:.2f} before, {load:.2f} after")
    print("| schedule | M | wall ms/step min / med | bubble min / med | theory | peak activations per rank, "
          "measured (MiB) | theory (micro-batches of a rank's layers) |")
    print("|---|---|---|---|---|---|---|")
    for i in range(len(everyone[0])):
        per_rank = [rows[i] for rows in everyone]
        name, m = per_rank[0][0], per_rank[0][1]
        walls = [max(per_rank[r][3][k][0] for r in range(pp)) for k in range(args.repeats)]
        # a repeat's bubble: each rank's idle / wall, averaged over ranks
        bubbles = [sum(1 - per_rank[r][3][k][1] / per_rank[r][3][k][0] for r in range(pp)) / pp
                   for k in range(args.repeats)]
        theory = bubble_fraction(name, pp, m)
        peaks = " / ".join(f"{max(s[2] for s in r[3]) / 2**20:.1f}" for r in per_rank)
        held = " / ".join(f"{peak_microbatches(name, pp, m, r):g}" for r in range(pp))
        per_mb = per_rank[0][4] / 2**20  # one micro-batch of rank 0's layers
        print(f"| {name} | {m} | {min(walls) * 1e3:.1f} / {statistics.median(walls) * 1e3:.1f} | "
              f"{min(bubbles):.3f} / {statistics.median(bubbles):.3f} | "
              f"{'-' if theory is None else f'{theory:.3f}'} | {peaks} | {held} (x {per_mb:.1f} MiB) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", default="2,4,8,16")
    parser.add_argument("--microbatch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    args = parser.parse_args()
    args.microbatches = [int(m) for m in args.microbatches.split(",")]
    args.schedules = args.schedules.split(",")
    args.load_before = os.getloadavg()[0]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.pp, port, args), nprocs=args.pp, join=True)


if __name__ == "__main__":
    main()
