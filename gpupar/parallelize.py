"""The one place that composes parallel strategies, in a fixed, visible order.

Order (as torchtitan's ``parallelize``): tensor parallel first (it rewrites layers into
sharded DTensor layers), then the pipeline split (it copies whole layers into stages), then
data parallel over the "dp" mesh dimension (FSDP or DDP wrap whatever the first two left).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from gpupar.weights import full_state_dict as checkpoint_full_state_dict
from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.parallel.ddp import apply_data_parallel, apply_ddp
from gpupar.parallel.fsdp import apply_fsdp, fsdp_mesh
from gpupar.parallel.layer_split import apply_layer_split, parse_devices
from gpupar.parallel.pipeline import Pipeline, check_microbatches, split_model
from gpupar.parallel.tensor import Plan, apply_tp
from gpupar.topology import Topology, degrees


def parallelize(model: nn.Module, topo: Topology, cfg: Config, tp_plan: Plan | None = None) -> nn.Module:
    """Place the model on this rank's device and wrap it for the chosen strategy.

    ``tp_plan`` (Python API only) replaces the automatic tensor-parallel plan.
    """
    model = model.to(topo.device)
    if topo.distributed:
        check_same_model(model, topo)
    strategy = cfg.parallel.strategy
    if strategy == "layer-split":
        return apply_layer_split(model, parse_devices(cfg.parallel.devices), cfg.parallel.split_points)
    if strategy in ("fsdp", "hsdp") and not (topo.tp_enabled or topo.pp_enabled):
        return apply_fsdp(model, fsdp_mesh(topo, cfg.parallel), cfg.parallel, cfg.train.precision)
    if strategy == "dp":
        return apply_data_parallel(model, topo)
    if not topo.distributed:
        return model
    if not (topo.tp_enabled or topo.pp_enabled):  # data parallel only: every replica must sync
        return apply_ddp(model, topo, cfg.parallel) if topo.dp_enabled else model

    # 1. Tensor parallel: shard layers across the "tp" ranks.
    if topo.tp_enabled:
        model = apply_tp(model, topo.mesh["tp"], tp_plan)
    # 2. Pipeline split: this rank keeps its stage(s) only.
    stages = split_model(model, topo.pp, topo.pp_rank, cfg.parallel) if topo.pp_enabled else [(0, model)]
    # 3. Data parallel over "dp": FSDP around each TP model or pipeline stage (torchtitan's order).
    #    (Not DDP: its bucket rebuild after the first step breaks under a pipeline's several
    #    backward passes per step, and it cannot hold DTensor parameters.)
    if topo.dp_enabled:
        stages = [(s, apply_fsdp(module, topo.mesh["dp"], cfg.parallel, cfg.train.precision)) for s, module in stages]
    if topo.pp_enabled:
        num_stages = topo.pp * (cfg.parallel.stages_per_rank if cfg.parallel.schedule == "interleaved-1f1b" else 1)
        return Pipeline(stages, num_stages, topo.device, topo.mesh["pp"].get_group(), cfg.parallel)
    return stages[0][1]


def preflight(cfg: Config, world: int) -> None:
    """Checks that need no ranks, made once before launching: the degrees multiply to the world
    size, and pipeline micro-batches divide each data-parallel rank's batch (when known)."""
    dp, _, pp = degrees(cfg, world)
    samples = cfg.train.batch_size or (cfg.data.samples if cfg.data.data is None and not cfg.data.val_fraction
                                       else None)
    if pp > 1 and samples:
        check_microbatches(samples // dp, cfg.parallel.microbatches or 2 * pp)


def full_state_dict(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict with the unparallelised names, on rank 0 (None elsewhere).

    DTensor shards (tensor parallel, FSDP) are gathered with ``full_tensor()``, a collective
    every rank joins; pipeline stages each hold part of the names and are gathered to rank 0.
    """
    if not (topo.tp_enabled or topo.pp_enabled):  # one device, DDP or FSDP alone
        state = checkpoint_full_state_dict(model)
        return state if topo.is_main else None
    modules = list(model.stages) if isinstance(model, Pipeline) else [model]
    state: dict[str, torch.Tensor] = {}
    # A 2-D (FSDP x TP) gather is two all-gathers; torch warns about that on every rank.
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)
    try:
        for module in modules:
            for name, value in unwrap(module).state_dict().items():
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                state[name] = value.detach().cpu()
    finally:
        redistribute_log.setLevel(level)
    if not topo.pp_enabled:
        return state if topo.is_main else None
    parts: list | None = [None] * topo.world_size if topo.is_main else None
    dist.gather_object(state, parts, dst=0)
    if not topo.is_main:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:  # type: ignore[union-attr]
        merged.update(part)
    return merged


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP / DataParallel wrapper."""
    return getattr(model, "module", model)


def check_same_model(model: nn.Module, topo: Topology) -> None:
    """Pre-flight: all ranks must hold the same parameter names, shapes and dtypes.

    A mismatch (say, a rank that read different data and built a different input layer)
    would otherwise surface as a hang or a cryptic size error inside a collective.
    """
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    everyone: list = [None] * topo.world_size
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diff = next(((a, b) for a, b in zip(everyone[0], theirs) if a != b), (everyone[0][-1:], theirs[-1:]))
            raise UsageError(f"rank {rank} built a different model than rank 0: {diff[1]} vs {diff[0]}")
