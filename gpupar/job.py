"""A job: the data, the model and its layout, checked once and then trained in each process.

``preflight`` runs every check that depends only on the config, the data's shape and the
model, in the launcher, before any rank starts or anything is written; ``train_from_config``
is what `gpupar train` does in each process: data + model -> parallelize -> fit -> run
directory. train, verify, bench and sweep all build their jobs here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpupar.config import Config, layout, to_toml
from gpupar.data import check_divisible, load_file, prepare_targets, split_validation, synthetic_regression
from gpupar.devices import describe
from gpupar.errors import TrainingError, UsageError
from gpupar.files import atomic_write_many, atomic_write_text
from gpupar import rundir
from gpupar.loop import History, as_samples, fit, make_loss, make_optimizer, mean_over_ranks
from gpupar.memory import format_memory_report, gather_memory_report
from gpupar.noise import disable_dropout, nudge_weights, record_first_grads
from gpupar.models import ModelSpec, build_model, check_shapes, model_spec
from gpupar.parallel.layer_split import parse_devices
from gpupar.parallel import tied
from gpupar.parallel.pipeline import stage_module, stage_names, stage_starts, trace_stages, traceable
from gpupar.parallelize import full_state_dict, micro_batch_size, parallelize, pipeline_units, tp_plan
from gpupar.topology import ParallelDims, Topology
from gpupar.tracking import open_tracker
from gpupar.weights import weights_writer


@dataclass
class Problem:
    """The data, a freshly initialised (not yet placed) model for one config, and its spec."""

    X: torch.Tensor
    y: torch.Tensor
    model: nn.Module
    spec: ModelSpec


def load_problem(cfg: Config, meta: bool = False) -> Problem:
    """Load or synthesise the data, then build the model with an input width that follows it.

    ``meta``: build the model on the meta device where it can (shapes, no memory, no compute),
    for the checks before launch; a model that cannot be built or run there is built on the CPU.
    """
    d, spec = cfg.data, model_spec(cfg.model)
    if d.data is None and spec.synthetic_data is not None:  # the model's own task (the GPT's tokens)
        X, y = spec.synthetic_data(d.samples, cfg.train.seed)
        return Problem(X, y, _build(cfg, spec, 0, 0, meta), spec)
    if d.data is None:
        X, y = synthetic_regression(d.samples, d.features, d.noise, cfg.train.seed)
        if d.task == "classification":
            y = (y > y.median()).long()  # a learnable two-class version of the classic target
    else:
        X, y = load_file(d.data, d.target)
    y = prepare_targets(y, d.task)
    out_features = int(y.max()) + 1 if d.task == "classification" else y.shape[1]
    model = _build(cfg, spec, X.shape[1], out_features, meta)
    try:
        check_shapes(model, X.to(_device_of(model)), y, d.task)
    except NotImplementedError:  # an op without a meta kernel: probe a real model instead
        model = _build(cfg, spec, X.shape[1], out_features, meta=False)
        check_shapes(model, X, y, d.task)
    return Problem(X, y, model, spec)


def _build(cfg: Config, spec: ModelSpec, n_in: int, n_out: int, meta: bool) -> nn.Module:
    if meta:
        try:
            with torch.device("meta"):
                return build_model(cfg.model, n_in, n_out, cfg.train.seed)
        except UsageError:
            raise
        except Exception:  # a factory that needs real tensors (loads a file, reads values)
            pass
    return build_model(cfg.model, n_in, n_out, cfg.train.seed)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def preflight(cfg: Config, world: int, ranks_per_node: int) -> ParallelDims:
    """Every check that needs no rank, made once before launching (or running here), so a bad
    layout is one line and exit 2 with no run directory and no rank process:

    the degrees against the world size; the batch against the data-parallel ranks,
    --grad-accum and the pipeline's micro-batches (with a size that fits the samples); the
    pipeline's options and stages against the model's layers; tensor-parallel divisibility of
    every sharded layer of every stage. The model is built on the meta device where it can.
    """
    lay = layout(cfg.parallel)
    dims = ParallelDims.resolve(lay, world, ranks_per_node) if lay.ranks else ParallelDims()
    problem = load_problem(cfg, meta=True)
    model, spec = problem.model, problem.spec
    n_train = len(split_validation(len(problem.X), cfg.data.val_fraction, cfg.train.seed)[0])
    batch = cfg.train.batch_size or n_train
    if batch > n_train:
        raise UsageError(f"--batch-size {batch} exceeds the {n_train} training samples")
    microbatches = 1
    if dims.pp > 1:
        check_pipeline_options(cfg)
        microbatches = cfg.parallel.microbatches or 2 * dims.pp
    check_divisible(batch, cfg.train.grad_accum, dims.dp, n_train, microbatches, cfg.train.batch_size is None)
    if lay.process == "layer-split":
        devices = parse_devices(cfg.parallel.devices)
        stage_starts(model, pipeline_units(model, spec), len(devices), cfg.parallel.split_points, flag="--devices")
    stages = [model]
    if dims.pp > 1:
        units = pipeline_units(model, spec)
        names = [name for unit in units for name in unit]
        every = stage_names(model, units, dims.pp, cfg.parallel)
        stages = [stage_module(model, keep, [n for n in names if n not in keep]) for keep in every]
        if traceable(model, spec.pipeline_units is not None):  # its stages will be cut from its traced forward
            if dims.tp > 1:
                raise UsageError(f"--tp {dims.tp} with --pp {dims.pp}: {type(model).__name__} is split by tracing its "
                                 "forward, and a traced stage's layers are graph modules that tensor parallel cannot "
                                 "shard yet; use --pp with dp, or build the model as an nn.Sequential")
            rows = micro_batch_size(cfg, dims, n_train)
            trace_stages(model, every, torch.zeros(rows, *problem.X.shape[1:], dtype=problem.X.dtype,
                                                   device=_device_of(model)))
    if dims.pp > 1:
        tied.check_pp(stages, model)
    if dims.tp > 1:
        from gpupar.parallel.tensor import check_divisible as check_tp_divisible

        for stage in stages:
            plan = tp_plan(stage, dims.tp, spec)
            check_tp_divisible(stage, plan, dims.tp)
            tied.check_tp(stage, plan)
    # One process on one device captures its whole step (graphs.py); layer-split spans devices.
    if cfg.train.cuda_graphs and dims.world == 1 and lay.process != "layer-split":
        from gpupar import graphs
        from gpupar.devices import pick_device

        graphs.check_config(cfg, pick_device(cfg.train.device).type)
    if cfg.parallel.sync_bn and (dims.tp > 1 or dims.pp > 1):
        raise UsageError("--sync-bn with --tp/--pp: only pure data-parallel layouts (ddp, fsdp, hsdp) sync BatchNorm yet")
    return dims


def check_pipeline_options(cfg: Config) -> None:
    """What a pipeline step does not support yet."""
    if cfg.train.grad_accum > 1:
        raise UsageError(f"--grad-accum {cfg.train.grad_accum} with --pp: use --microbatches to split the batch")
    if cfg.data.val_fraction:
        raise UsageError(f"--val-fraction {cfg.data.val_fraction} with --pp: validation is not supported yet")
    if cfg.optim.clip_grad_norm is not None:
        raise UsageError("--clip-grad-norm with --pp: a global norm over stages is not supported yet")
    if cfg.train.precision != "fp32":
        raise UsageError(f"--precision {cfg.train.precision} with --pp: only fp32 is supported yet")
    if cfg.checkpoint.checkpoint_every or cfg.checkpoint.resume:
        raise UsageError("--checkpoint-every / --resume with --pp: pipeline checkpoints are not supported yet")


def layout_name(cfg: Config, topo: Topology) -> str:
    """What runs, in words: ``fsdp(dp=2) x tp(2)``, ``ddp(dp=4)``, ``single``, ``layer-split``."""
    process = layout(cfg.parallel).process
    if process in ("dataparallel", "layer-split"):
        return process
    return topo.dims.describe(cfg.parallel.schedule if topo.pp > 1 else "")


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def train_from_config(cfg: Config, topo: Topology, log=print) -> tuple[nn.Module, History, Path]:
    """Train per ``cfg`` on ``topo``; rank 0 writes config.toml, metrics.jsonl and model.safetensors.

    The run directory is claimed first (``rundir``: one run per directory, a run id for its
    checkpoints); its results are written together at the end, so a failure leaves the
    directory's earlier files as they were and says so.
    """
    from gpupar.launch import launched_by_torchrun

    problem = load_problem(cfg)
    with rundir.for_rank(cfg, topo.is_main, launched_by_torchrun()) as run:
        try:
            return _train(cfg, topo, problem, run, log)
        except TrainingError as exc:
            raise TrainingError(f"{exc}; {run.unchanged()}") from None
        except OSError as exc:  # a full disk, a read-only directory: the files were not replaced
            raise TrainingError(f"{exc.filename or run.path}: {exc.strerror or exc}; {run.unchanged()}") from None


def _train(cfg: Config, topo: Topology, problem: Problem, run: rundir.RunDir, log) -> tuple[nn.Module, History, Path]:
    run_dir = run.path
    name = layout_name(cfg, topo)
    config_now = topo.is_main and "config.toml" not in run.earlier
    if topo.is_main:
        where = f" x {topo.world_size} ranks: {name}" if topo.distributed else (f" ({name})" if name != "single" else "")
        log(f"Using device: {describe(topo.device)}{where}")
        if config_now:  # a new run: its config is there from the start (export copies it beside weights)
            atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    train_set, val_set = as_samples((problem.X, problem.y), cfg)
    if cfg.verify.no_dropout:
        disable_dropout(problem.model)
    if cfg.verify.nudge_init:  # verify's rounding-noise reference
        nudge_weights(problem.model)
    inputs = train_set.take(slice(None))[0] if topo.pp > 1 else None  # a pipeline may trace the forward
    parallel = parallelize(problem.model, topo, cfg, problem.spec, inputs)
    model = parallel.model
    step = parallel.step
    if cfg.verify.first_grads:
        step = record_first_grads(step, model, topo, run_dir / "first_grads.safetensors")
    optimizer = make_optimizer(model, cfg)
    from gpupar.checkpoint import Checkpointer  # DCP: imported only by runs that checkpoint

    checkpoints = Checkpointer(cfg, topo, run_dir, log, run.run_id) if (
        cfg.checkpoint.checkpoint_every or cfg.checkpoint.resume or os.environ.get("TORCHELASTIC_RESTART_COUNT")) else None
    tracker = open_tracker(cfg, run_dir, topo)  # --track: TensorBoard or MLflow, on rank 0 only
    with tracker.failing_on_error():
        history = fit(model, train_set, cfg, topo, make_loss(cfg, problem.spec), optimizer, val_set, log=log,
                      checkpoints=checkpoints, on_record=tracker.log, step_fn=step)
    memory = gather_memory_report(model, optimizer, history.grad_bytes, topo)
    if cfg.train.save_step_losses:
        history.step_losses = mean_over_ranks(history.step_losses, topo)
    # Sharded strategies hold pieces of the weights: every rank joins the gather to rank 0.
    state = full_state_dict(model, topo)
    if topo.is_main:
        records = _earlier_records(run_dir / "metrics.jsonl", history.start_step) + history.records
        if topo.distributed:  # one record per rank, marked so epoch readers can skip them
            records += [{"event": "memory", **row} for row in memory]
        summary = {"model": cfg.model.name, "strategy": name, "world_size": topo.world_size,
                   "final_loss": history.final_loss, "wall_time_s": history.wall_time,
                   "samples_per_s": history.samples_per_s, "memory_per_rank": memory,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run.run_id}
        speed = f"{history.samples_per_s:,.0f} samples/s"
        if problem.spec.tokens_per_sample > 1:  # a sample is a sequence of tokens
            summary["tokens_per_s"] = history.samples_per_s * problem.spec.tokens_per_sample
            speed += f" | {summary['tokens_per_s']:,.0f} tokens/s"
        if history.start_step:
            summary["resumed_at_step"] = history.start_step
        if history.skipped_steps:
            summary["skipped_steps"] = history.skipped_steps
        # All results at once, summary.json last (it marks the run finished): a failure while
        # writing any of them (a full disk) renames none and leaves the earlier ones intact.
        results = [(run_dir / "metrics.jsonl", _text("".join(json.dumps(r) + "\n" for r in records)))]
        if cfg.train.save_step_losses:
            results.append((run_dir / "step_losses.json", _text(json.dumps(history.step_losses))))
        results.append((run_dir / "model.safetensors", weights_writer(state)))
        if not config_now:  # a resumed run: its config changes only together with its results
            results.append((run_dir / "config.toml", _text(to_toml(cfg))))
        results.append((run_dir / "summary.json", _text(json.dumps(summary, indent=2) + "\n")))
        atomic_write_many(results)
        tracker.finish(run_dir, summary)
        log(f"Final loss: {history.final_loss:.4f} | wall time: {history.wall_time:.2f} s | {speed}")
        if topo.distributed:
            log(format_memory_report(memory))
        log(f"Saved run to {run_dir}/ (model.safetensors, metrics.jsonl, config.toml)")
    return model, history, run_dir


def _text(text: str):
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def _earlier_records(path: Path, start_step: int) -> list[dict]:
    """A resumed run keeps the metrics its earlier part logged up to the checkpoint."""
    if not start_step or not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "event" not in r and r.get("step", 0) <= start_step]

