"""The Python API: ``gpupar.train`` for any ``nn.Module`` on one device or, in a script started
by torchrun, with the layout in ``config.parallel``; ``gpupar.verify`` for the parity verdict.

    # torchrun --nproc-per-node 2 my_script.py
    cfg = gpupar.Config()
    cfg.parallel.strategy = "ddp"          # or "fsdp", "tp"; or set dp / tp / pp
    result = gpupar.train(model, (X, y), config=cfg)

Each rank runs the same script; ``train`` joins the process group torchrun set up, applies
the layout with the CLI's own ``parallelize`` and trains with the CLI's own loop, so a run
gives the same weights as ``gpupar train`` with the same flags, model and data.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from gpupar.config import Config, layout
from gpupar.data import as_samples
from gpupar.errors import UsageError
from gpupar.models import ModelSpec
from gpupar.training.loop import Hooks, fit
from gpupar.training.recipe import make_loss, make_optimizer
from gpupar.training.state import TrainResult
from gpupar.training.step import BatchLoss, split_batch


def train(model: nn.Module, data, loss: nn.Module | Callable | None = None,
          optimizer: torch.optim.Optimizer | None = None, config: Config | None = None,
          val_data=None) -> TrainResult:
    """Train ``model`` on ``data``: ``(X, y)`` tensors, a map-style Dataset (items of any
    structure ``default_collate`` takes), or a DataLoader over one whose ``batch_size`` is the
    global batch (see gpupar.data.as_samples).

    Without a parallel layout in ``config`` it trains on one device. With one (say
    ``config.parallel.strategy = "ddp"``) the script must run under torchrun: every rank passes
    the same model (same seed) and the same data, and takes its own slice of every batch. The
    returned model is this rank's: the whole model under DDP, its shards under FSDP or TP.

    ``loss``: a torch criterion (``nn.MSELoss()``) is applied to the model's predictions (a
    ``ModelOutput``'s logits, a tuple's first element) and the batch's target; a plain function
    is called as ``loss(output, batch)`` with the whole output and the batch as collated. With
    neither, the model's own loss (``output.loss``, a Hugging Face model given ``labels``) comes
    first, then config.train.loss.
    """
    from gpupar.devices import pick_device
    from gpupar.launch.elastic import launched_by_torchrun
    from gpupar.parallelize import parallelize, rank0_initial_state
    from gpupar.topology import ParallelDims, Topology

    cfg = (config or Config()).validate()
    _refuse_what_the_api_does_not_write(cfg)
    if layout(cfg.parallel).ranks:
        if not launched_by_torchrun():
            raise UsageError(f"config.parallel.strategy {cfg.parallel.strategy!r} runs one process per rank: start "
                             "this script with torchrun --nproc-per-node N (in a notebook, use gpupar.notebook_launch)")
        topo = Topology.from_env(cfg)
    else:  # the best single device (or a one-process layout: layer-split, DataParallel)
        topo = Topology.single(pick_device(cfg.train.device), ParallelDims.of(cfg))
    if optimizer is not None and (topo.dims.fsdp_enabled or topo.tp_enabled or topo.pp_enabled):
        raise UsageError("pass no optimizer with fsdp, tp or pp: their parameters are replaced by shards, so "
                         "gpupar builds the optimizer after sharding (config.optim)")
    data, val_data = (_integer_features(model, d, topo.is_main) for d in (data, val_data))
    train_set, val_set = as_samples(data, cfg)
    if val_data is not None:
        val_set = as_samples(val_data, Config())[0]
    spec = ModelSpec("user", lambda *_: model)
    # A pipeline traces the forward on a few samples (never the whole Dataset collated), an
    # automatic TP plan on one.
    rows = (cfg.train.batch_size or len(train_set)) if topo.pp_enabled else 1
    inputs = split_batch(train_set.take(slice(0, rows)))[0][0] if topo.pp_enabled or topo.tp_enabled else None
    parallel = parallelize(rank0_initial_state(model.to(topo.device), topo), topo, cfg, spec, inputs)
    optimizer = optimizer or make_optimizer(parallel.model, cfg)
    # A torch criterion (nn.Module) gets (prediction, target); a plain function gets (output, batch).
    loss_fn = loss if loss is None or isinstance(loss, nn.Module) else BatchLoss(loss)
    history = fit(parallel, train_set, cfg, topo, loss_fn or make_loss(cfg), optimizer, val_set,
                  hooks=Hooks(log=print if topo.is_main else (lambda _: None)))
    return TrainResult(getattr(parallel.model, "module", parallel.model), history)


def _refuse_what_the_api_does_not_write(cfg: Config) -> None:
    """``train`` returns the model and its history and writes nothing: a run directory,
    checkpoints, a resume or a tracker set in the config would be ignored, silently."""
    asked = [("config.train.run_dir", cfg.train.run_dir), ("config.checkpoint.checkpoint_every",
             cfg.checkpoint.checkpoint_every), ("config.checkpoint.resume", cfg.checkpoint.resume),
             ("config.track.track", None if cfg.track.track == "none" else cfg.track.track)]
    for name, value in asked:
        if value is not None:
            raise UsageError(f"{name} is {value!r}, but gpupar.train writes no run directory, checkpoints or "
                             "tracking: it returns the model and its history. Use `gpupar train` (the CLI) for "
                             "those, or gp = gpupar.setup() and gp.save / gp.load in your own loop")


def _integer_features(model: nn.Module, data, main: bool):
    """Tensors ``(X, y)`` whose X is integer: as they are where the model takes them (an
    embedding of ids), else cast to its float dtype with a note (``problem.integer_features``)."""
    from gpupar.models.builtin import probe_forward
    from gpupar.problem import integer_features

    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)) \
            or data[0].dim() == 0 or data[0].is_floating_point() or data[0].is_complex():
        return data
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    X, _, note = integer_features(data[0], model, lambda x: probe_forward(model, x.to(device)))
    if note is not None and main:
        print(f"gpupar: note: data: {note}", file=sys.stderr, flush=True)
    return X, data[1]


def verify(config: Config, rtol: float | None = None, log: Callable[[str], None] = print):
    """Train ``config``'s model with its layout and on one device, and return the ``Verdict``
    (``verdict.passed``; ``gpupar.parity.verdict.report(verdict)`` is the CLI's table). The model must
    be importable by the ranks: ``config.model.name = "package.module:factory"`` or a built-in."""
    from gpupar.parity import run_verify

    return run_verify(config.validate(), rtol, log)
