"""A job: the checks that need the data and the model, and what one process of `gpupar train` runs.

``preflight`` runs every check that depends only on the config, the data's shape and the
model, in the launcher, before any rank starts or anything is written. ``train_from_config``
is what each process runs: problem -> parallelize -> fit -> the run directory's results.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gpupar.config import Config
from gpupar.config_file import to_toml
from gpupar.data import as_samples, check_batch_divisible, split_validation
from gpupar.devices import describe
from gpupar.errors import TrainingError, UsageError
from gpupar.memory import format_memory_report, gather_memory_report
from gpupar.parallelize import (captures_whole_step, check_layout, full_state_dict, micro_batch_size, parallelize,
                                rank0_initial_state)
from gpupar.problem import Problem, device_of, load_problem
from gpupar.run import rundir
from gpupar.run.files import atomic_write_many, atomic_write_text
from gpupar.topology import ParallelDims, Topology
from gpupar.tracking import open_tracker
from gpupar.training.loop import Hooks, fit, mean_over_ranks
from gpupar.training.recipe import make_loss, make_optimizer
from gpupar.training.state import History
from gpupar.training.step import StepFn
from gpupar.weights import weights_writer


@dataclass(frozen=True)
class Probes:
    """What gpupar verify asks of a training run. Its harness builds them (verify/harness.py);
    the job calls them and knows nothing else of verify."""

    prepare: Callable[[nn.Module], None] | None = None
    """Runs on the freshly built model, before it is parallelised (dropout off, the one-ulp nudge)."""
    wrap_step: Callable[[StepFn, nn.Module, Topology, Path], StepFn] | None = None
    """(step, model, topology, run dir) -> the step that the loop runs (records the step-1 gradients)."""
    step_losses: bool = False
    """Write every step's loss, the mean over ranks, to step_losses.json."""


def preflight(cfg: Config, world: int, ranks_per_node: int) -> ParallelDims:
    """Every check that needs no rank, made once before launching (or running here), so a bad
    layout is one line and exit 2 with no run directory and no rank process:

    the degrees against the world size; the batch against the data-parallel ranks,
    --grad-accum and the pipeline's micro-batches (with a size that fits the samples); then
    ``parallelize.check_layout``, every strategy's check in the order they are applied; and
    what a captured CUDA-graph step cannot do. The model is built on the meta device where it can.
    """
    dims = ParallelDims.of(cfg, world, ranks_per_node)
    problem = load_problem(cfg, meta=True)
    if not any(p.requires_grad for p in problem.model.parameters()):  # the optimizer's own error was a traceback
        raise UsageError(f"--model {cfg.model.name}: the model has no trainable parameters (none requires grad); "
                         "nothing to train")
    if problem.source is not None:  # what a Dataset, stream or DataLoader needs (a batch size, ...)
        cfg = copy.deepcopy(cfg)  # a DataLoader's batch size becomes the checks' (the ranks set their own)
        as_samples(problem.source, cfg)
    samples = problem.samples  # None: a stream without len, known after a pass
    n_train = len(split_validation(samples, cfg.data.val_fraction, cfg.train.seed)[0]) if samples is not None \
        else cfg.train.batch_size
    batch = cfg.train.batch_size or n_train
    if batch > n_train:
        raise UsageError(f"--batch-size {batch} exceeds the {n_train} training samples")
    if dims.pp_enabled:
        check_pipeline_options(cfg, dims)
    check_batch_divisible(batch, cfg.train.grad_accum, dims.dp, n_train, dims.microbatches,
                          cfg.train.batch_size is None)
    rows = micro_batch_size(cfg, dims, n_train) if dims.pp_enabled else 1
    example = torch.zeros(rows, *problem.X.shape[1:], dtype=problem.X.dtype, device=device_of(problem.model)) \
        if problem.X is not None else None
    check_layout(problem.model, dims, cfg, problem.spec, example)
    if captures_whole_step(cfg, dims):  # what a captured step cannot do (training/graphs.py)
        from gpupar.devices import pick_device
        from gpupar.training import graphs

        graphs.check_config(cfg, pick_device(cfg.train.device).type)
    return dims


def check_pipeline_options(cfg: Config, dims: ParallelDims) -> None:
    """What a schedule needs of the layout."""
    p = cfg.parallel
    if p.schedule in ("zbv", "dualpipev") and p.stages_per_rank != 2:
        raise UsageError(f"--schedule {p.schedule} places exactly 2 stages per rank in a V; "
                         f"got --stages-per-rank {p.stages_per_rank}")
    m, pp = dims.microbatches, dims.pp
    if p.schedule == "dualpipev" and m < 2 * pp:  # torch's ScheduleDualPipeV: M >= its 2 x pp stages
        raise UsageError(f"--schedule dualpipev needs at least as many --microbatches as stages ({2 * pp}); "
                         f"got {m}")
    rounds = max(1, m // pp)  # the interleaved schedules run M in rounds of pp micro-batches
    if p.schedule in ("interleaved-1f1b", "interleaved-zb") and m % rounds:
        raise UsageError(f"--schedule {p.schedule} runs the micro-batches in M // pp = {rounds} rounds, which must "
                         f"divide --microbatches {m}; use e.g. --microbatches {rounds * pp}")


def layout_name(cfg: Config, topo: Topology) -> str:
    """What runs, in words: ``fsdp(dp=2) x tp(2)``, ``ddp(dp=4)``, ``single``, ``layer-split``."""
    if topo.dims.process in ("dataparallel", "layer-split"):
        return topo.dims.process
    return topo.dims.describe(cfg.parallel.schedule if topo.pp_enabled else "")


def train_from_config(cfg: Config, topo: Topology, run: rundir.RunDir, log=print,
                      probes: Probes = Probes()) -> tuple[nn.Module, History, Path]:
    """Train per ``cfg`` on ``topo`` into the claimed ``run`` directory; rank 0 writes
    config.toml, metrics.jsonl and model.safetensors.

    The results are written together at the end, so a failure leaves the directory's earlier
    files as they were and says so.
    """
    problem = load_problem(cfg)
    try:
        return _train(cfg, topo, problem, run, log, probes)
    except TrainingError as exc:
        raise TrainingError(f"{exc}; {run.unchanged()}") from None
    except OSError as exc:  # a full disk, a read-only directory: the files were not replaced
        raise TrainingError(f"{exc.filename or run.path}: {exc.strerror or exc}; {run.unchanged()}") from None


def _train(cfg: Config, topo: Topology, problem: Problem, run: rundir.RunDir, log,
           probes: Probes) -> tuple[nn.Module, History, Path]:
    config_now = topo.is_main and "config.toml" not in run.earlier
    if topo.is_main:
        name = layout_name(cfg, topo)
        where = f" x {topo.world_size} ranks: {name}" if topo.distributed else (f" ({name})" if name != "single" else "")
        log(f"Using device: {describe(topo.device)}{where}")
        if config_now:  # a new run: its config is there from the start (export copies it beside weights)
            atomic_write_text(run.path / "config.toml", to_toml(cfg))
    train_set, val_set = as_samples(problem.data, cfg)
    if probes.prepare is not None:
        probes.prepare(problem.model)
    # A pipeline may trace the forward on a micro-batch; an automatic TP plan on one row.
    inputs = train_set.take(slice(None if topo.pp_enabled else 1))[0] if topo.pp_enabled or topo.tp_enabled else None
    model = rank0_initial_state(problem.model.to(topo.device), topo)  # as DDP: FSDP, TP and PP too
    parallel = parallelize(model, topo, cfg, problem.spec, inputs)
    if probes.wrap_step is not None:
        parallel.step = probes.wrap_step(parallel.step, parallel.model, topo, run.path)
    optimizer = make_optimizer(parallel.model, cfg)
    checkpoints = None
    if cfg.checkpoint.checkpoint_every or cfg.checkpoint.resume or os.environ.get("TORCHELASTIC_RESTART_COUNT"):
        from gpupar.checkpoint import Checkpointer  # DCP: imported only by runs that checkpoint

        checkpoints = Checkpointer(cfg, topo, run.path, log, run.run_id)
    tracker = open_tracker(cfg, run.path, topo)  # --track: TensorBoard or MLflow, on rank 0 only
    with tracker.failing_on_error():
        history = fit(parallel, train_set, cfg, topo, make_loss(cfg, problem.spec.loss), optimizer, val_set,
                      checkpoints, Hooks(log=log, on_record=tracker.log))
    memory = gather_memory_report(parallel.model, optimizer, history.grad_bytes, topo)
    if probes.step_losses:
        history.step_losses = mean_over_ranks(history.step_losses, topo)
    # Sharded strategies hold pieces of the weights: every rank joins the gather to rank 0.
    state = full_state_dict(parallel.model, topo)
    if topo.is_main:
        summary = _summary(cfg, topo, problem, history, memory, run.run_id)
        _write_results(cfg, run, history, memory, state, summary, config_now, probes.step_losses)
        tracker.finish(run.path, summary)
        speed = f"{history.samples_per_s:,.0f} samples/s"
        if "tokens_per_s" in summary:
            speed += f" | {summary['tokens_per_s']:,.0f} tokens/s"
        log(f"Final loss: {history.final_loss:.4f} | wall time: {history.wall_time:.2f} s | {speed}")
        if topo.distributed:
            log(format_memory_report(memory))
        log(f"Saved run to {run.path}/ (model.safetensors, metrics.jsonl, config.toml)")
    return parallel.model, history, run.path


def _summary(cfg: Config, topo: Topology, problem: Problem, history: History, memory: list, run_id: str) -> dict:
    summary = {"model": cfg.model.name, "strategy": layout_name(cfg, topo), "world_size": topo.world_size,
               "final_loss": history.final_loss, "wall_time_s": history.wall_time,
               "samples_per_s": history.samples_per_s, "memory_per_rank": memory,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run_id}
    if problem.spec.tokens_per_sample > 1:  # a sample is a sequence of tokens
        summary["tokens_per_s"] = history.samples_per_s * problem.spec.tokens_per_sample
    if history.start_step:
        summary["resumed_at_step"] = history.start_step
    if history.skipped_steps:
        summary["skipped_steps"] = history.skipped_steps
    return summary


def _write_results(cfg: Config, run: rundir.RunDir, history: History, memory: list, state: dict, summary: dict,
                   config_now: bool, step_losses: bool) -> None:
    """All results at once, summary.json last (it marks the run finished): a failure while
    writing any of them (a full disk) renames none and leaves the earlier ones intact."""
    records = _earlier_records(run.path / "metrics.jsonl", history.start_step) + history.records
    if summary["world_size"] > 1:  # one record per rank, marked so epoch readers can skip them
        records += [{"event": "memory", **row} for row in memory]
    results = [(run.path / "metrics.jsonl", _text("".join(json.dumps(r) + "\n" for r in records)))]
    if step_losses:
        results.append((run.path / "step_losses.json", _text(json.dumps(history.step_losses))))
    results.append((run.path / "model.safetensors", weights_writer(state)))
    if not config_now:  # a resumed run: its config changes only together with its results
        results.append((run.path / "config.toml", _text(to_toml(cfg))))
    results.append((run.path / "summary.json", _text(json.dumps(summary, indent=2) + "\n")))
    atomic_write_many(results)


def _text(text: str):
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def _earlier_records(path: Path, start_step: int) -> list[dict]:
    """A resumed run keeps the metrics its earlier part logged up to the checkpoint."""
    if not start_step or path.is_symlink() or not path.is_file():  # never read outside the run
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # untrusted: a line gpupar did not write is dropped
            continue
    return [r for r in records if isinstance(r, dict) and "event" not in r
            and isinstance(r.get("step", 0), int) and r.get("step", 0) <= start_step]
