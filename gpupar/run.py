"""What `gpupar train` does in each process: data + model -> parallelize -> fit -> run directory."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpupar.weights import save_weights
from gpupar.config import Config, to_toml
from gpupar.data import load_file, prepare_targets, synthetic_regression
from gpupar.devices import describe
from gpupar.memory import format_memory_report, gather_memory_report
from gpupar.models import build_model, check_shapes
from gpupar.parallelize import full_state_dict, parallelize
from gpupar.checkpoint import Checkpointer
from gpupar.topology import Topology
from gpupar.tracking import open_tracker
from gpupar.loop import History, as_samples, fit, make_loss, make_optimizer, mean_over_ranks


@dataclass
class Problem:
    """The data and a freshly initialised (not yet placed) model for one config."""

    X: torch.Tensor
    y: torch.Tensor
    model: nn.Module


def load_problem(cfg: Config) -> Problem:
    """Load or synthesise the data, then build the model with an input width that follows it."""
    d = cfg.data
    if cfg.model.name == "gpt" and d.data is None:  # next-token prediction on a learnable synthetic task
        from gpupar.gpt import synthetic_tokens

        X, y = synthetic_tokens(d.samples, cfg.model.seq_len, cfg.model.vocab, cfg.train.seed)
        return Problem(X, y, build_model(cfg.model, 0, cfg.model.vocab, cfg.train.seed))
    if d.data is None:
        X, y = synthetic_regression(d.samples, d.features, d.noise, cfg.train.seed)
        if d.task == "classification":
            y = (y > y.median()).long()  # a learnable two-class version of the classic target
    else:
        X, y = load_file(d.data, d.target)
    y = prepare_targets(y, d.task)
    out_features = int(y.max()) + 1 if d.task == "classification" else y.shape[1]
    model = build_model(cfg.model, X.shape[1], out_features, cfg.train.seed)
    check_shapes(model, X, y, d.task)
    return Problem(X, y, model)


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def train_from_config(cfg: Config, topo: Topology, log=print) -> tuple[nn.Module, History, Path]:
    """Train per ``cfg`` on ``topo``; rank 0 writes config.toml, metrics.jsonl and model.safetensors."""
    problem = load_problem(cfg)
    run_dir = default_run_dir(cfg)
    if topo.is_main:
        where = f" x {topo.world_size} ranks ({cfg.parallel.strategy})" if topo.distributed else ""
        log(f"Using device: {describe(topo.device)}{where}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    train_set, val_set = as_samples((problem.X, problem.y), cfg)
    model = parallelize(problem.model, topo, cfg)
    optimizer = make_optimizer(model, cfg)
    checkpoints = Checkpointer(cfg, topo, run_dir, log) if (cfg.checkpoint.checkpoint_every or cfg.checkpoint.resume
                                                           or os.environ.get("TORCHELASTIC_RESTART_COUNT")) else None
    tracker = open_tracker(cfg, run_dir, topo)  # --track: TensorBoard or MLflow, on rank 0 only
    with tracker.failing_on_error():
        history = fit(model, train_set, cfg, topo, make_loss(cfg), optimizer, val_set, log=log,
                      checkpoints=checkpoints, on_record=tracker.log)
    memory = gather_memory_report(model, optimizer, history.grad_bytes, topo)
    if cfg.train.save_step_losses:
        history.step_losses = mean_over_ranks(history.step_losses, topo)
        if topo.is_main:
            (run_dir / "step_losses.json").write_text(json.dumps(history.step_losses))
    # Sharded strategies hold pieces of the weights: every rank joins the gather to rank 0.
    state = full_state_dict(model, topo)
    if topo.is_main:
        records = _earlier_records(run_dir / "metrics.jsonl", history.start_step) + history.records
        with (run_dir / "metrics.jsonl").open("w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            if topo.distributed:  # one record per rank, marked so epoch readers can skip them
                for row in memory:
                    fh.write(json.dumps({"event": "memory", **row}) + "\n")
        save_weights(state, run_dir / "model.safetensors")
        summary = {"model": cfg.model.name, "strategy": cfg.parallel.strategy, "world_size": topo.world_size,
                   "final_loss": history.final_loss, "wall_time_s": history.wall_time,
                   "samples_per_s": history.samples_per_s, "memory_per_rank": memory,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        speed = f"{history.samples_per_s:,.0f} samples/s"
        if cfg.model.name == "gpt":  # a sample is a sequence of seq_len tokens
            summary["tokens_per_s"] = history.samples_per_s * cfg.model.seq_len
            speed += f" | {summary['tokens_per_s']:,.0f} tokens/s"
        if history.start_step:
            summary["resumed_at_step"] = history.start_step
        if history.skipped_steps:
            summary["skipped_steps"] = history.skipped_steps
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracker.finish(run_dir, summary)
        log(f"Final loss: {history.final_loss:.4f} | wall time: {history.wall_time:.2f} s | {speed}")
        if topo.distributed:
            log(format_memory_report(memory))
        log(f"Saved run to {run_dir}/ (model.safetensors, metrics.jsonl, config.toml)")
    return model, history, run_dir


def _earlier_records(path: Path, start_step: int) -> list[dict]:
    """A resumed run keeps the metrics its earlier part logged up to the checkpoint."""
    if not start_step or not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "event" not in r and r.get("step", 0) <= start_step]

