"""One rank of one bench combination: train through gpupar's own loop (or a peer's) and time it.

Timing. A warm-up step or more first (allocator, kernels, DDP's first bucket rebuild). On a
GPU each step's end is a CUDA event, read after one synchronisation at the end, so timing
adds no host sync per step; the timed window opens and closes with a barrier after a
device sync, so every rank's clock covers the same work. The slowest rank sets each step's
time (max over ranks), and the median over steps resists outliers.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from gpupar.measure.flops import cpu_matmul_probe
from gpupar.config import Config
from gpupar.config_file import load_toml
from gpupar.errors import first_line
from gpupar.run.files import atomic_write_text
from gpupar.memory import peak_bytes

class StepTimer:
    """``fit``'s per-step hook: marks the end of the warm-up and of every timed step."""

    def __init__(self, topo, warmup: int, steps: int):
        self.topo, self.warmup, self.last = topo, warmup, warmup + steps
        self.cuda = topo.device.type == "cuda"
        self.marks: list[tuple[float, object]] = []  # (perf_counter, CUDA event or None)
        self.window_s = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.topo.device)
        if self.topo.distributed:
            dist.barrier()  # every rank opens and closes the window together

    def __call__(self, step: int) -> None:
        if not self.warmup <= step <= self.last:
            return
        if step == self.warmup:
            self._sync()
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((time.perf_counter(), event))
        if step == self.last:
            self._sync()
            self.window_s = time.perf_counter() - self.marks[0][0]

    def step_seconds(self) -> list[float]:
        if self.cuda:
            return [a[1].elapsed_time(b[1]) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]

def gather_result(topo, timer: StepTimer, probe_tflops: float | None) -> dict:
    """Every rank's step times and memory; the slowest rank sets each step's time."""
    mine = {"step_s": timer.step_seconds(), "window_s": timer.window_s, "threads": torch.get_num_threads(),
            "memory": peak_bytes(topo.device), "probe": probe_tflops}
    everyone = [mine]
    if topo.distributed:
        everyone = [None] * topo.world_size
        dist.all_gather_object(everyone, mine)
    per_step = [max(r["step_s"][i] for r in everyone) for i in range(len(mine["step_s"]))]
    return {"step_s": per_step, "median_step_s": statistics.median(per_step),
            "window_s": max(r["window_s"] for r in everyone),
            "memory_per_rank_bytes": [r["memory"][0] for r in everyone], "memory_kind": mine["memory"][1],
            "threads_per_rank": mine["threads"], "device": str(topo.device),
            "cpu_probe_tflops": sum(r["probe"] for r in everyone) if probe_tflops is not None else None}

def bench_worker(config_path: str, result_path: str, steps: int, warmup: int, peer: str | None = None) -> None:
    """One rank of one combination: train through gpupar's loop (or a peer's), write the result.

    A failure is written to RESULT.rankN.err (one line) before it propagates, so the
    bench can name the reason in its table.
    """
    from gpupar import launch

    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_toml(config_path)
        launch.run(cfg, "bench-worker", lambda topo, _: _bench_here(cfg, topo, result_path, steps, warmup, peer),
                   claim=False, checked=True)
    except BaseException as exc:
        first = first_line(exc, "")
        atomic_write_text(f"{result_path}.rank{rank}.err", f"{type(exc).__name__}: {first}"[:300])
        raise

def _bench_here(cfg: Config, topo, result_path: str, steps: int, warmup: int, peer: str | None) -> None:
    if topo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(topo.device)
    probe = None
    if topo.device.type == "cpu":
        if topo.distributed:
            dist.barrier()  # all ranks probe at once: they share the machine's cores
        probe = cpu_matmul_probe(cfg.train.precision, seconds=0.3)
    timer = StepTimer(topo, warmup, steps)
    if peer is None:
        _train_gpupar(cfg, topo, timer)
    else:
        from gpupar.bench.peers import train_peer

        train_peer(peer, cfg, topo, timer)
    result = gather_result(topo, timer, probe)
    if topo.is_main:
        atomic_write_text(result_path, json.dumps(result))


def _train_gpupar(cfg: Config, topo, timer: StepTimer) -> None:
    from gpupar.job import load_problem
    from gpupar.data import as_samples
    from gpupar.training.loop import Hooks, fit
    from gpupar.training.recipe import make_loss, make_optimizer
    from gpupar.parallelize import parallelize

    problem = load_problem(cfg)
    train_set, _ = as_samples((problem.X, problem.y), cfg)
    parallel = parallelize(problem.model, topo, cfg, problem.spec, problem.X[:1] if topo.tp_enabled else None)
    fit(parallel, train_set, cfg, topo, make_loss(cfg, problem.spec.loss), make_optimizer(parallel.model, cfg),
        hooks=Hooks(log=lambda _: None, on_step=timer))
