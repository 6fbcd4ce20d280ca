"""What `gpupar train` does in each process: data + model -> parallelize -> fit -> run directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpupar.checkpoint import save_weights
from gpupar.config import Config, to_toml
from gpupar.data import load_file, prepare_targets, synthetic_regression
from gpupar.devices import describe
from gpupar.models import build_model, check_shapes
from gpupar.parallelize import parallelize
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
    tracker = open_tracker(cfg, run_dir, topo)  # --track: TensorBoard or MLflow, on rank 0 only
    with tracker.failing_on_error():
        history = fit(model, train_set, cfg, topo, make_loss(cfg), make_optimizer(model, cfg), val_set, log=log,
                      on_record=tracker.log)
    if cfg.train.save_step_losses:
        history.step_losses = mean_over_ranks(history.step_losses, topo)
        if topo.is_main:
            (run_dir / "step_losses.json").write_text(json.dumps(history.step_losses))
    if topo.is_main:
        with (run_dir / "metrics.jsonl").open("w") as fh:
            for record in history.records:
                fh.write(json.dumps(record) + "\n")
        save_weights(unwrap(model).state_dict(), run_dir / "model.safetensors")
        summary = {"model": cfg.model.name, "strategy": cfg.parallel.strategy, "world_size": topo.world_size,
                   "final_loss": history.final_loss, "wall_time_s": history.wall_time,
                   "samples_per_s": history.samples_per_s, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracker.finish(run_dir, summary)
        log(f"Final loss: {history.final_loss:.4f} | wall time: {history.wall_time:.2f} s | "
            f"{history.samples_per_s:,.0f} samples/s")
        log(f"Saved run to {run_dir}/ (model.safetensors, metrics.jsonl, config.toml)")
    return model, history, run_dir


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP / DataParallel wrapper."""
    return getattr(model, "module", model)
