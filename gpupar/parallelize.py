"""The one place that composes parallel strategies, in a fixed, visible order.

Order (as torchtitan's ``parallelize`` with its pipeline split): first the pipeline split
(this rank keeps its stage or stages), then tensor parallel on each stage (it rewrites
layers into sharded DTensor layers; planning it per stage means a colwise/rowwise pair never
straddles two stages), then activation checkpointing per block, then data parallel over the
data-parallel mesh dimensions: FSDP or HSDP wherever parameters are sharded, DDP for whole
replicas. Every step reads the
``ParallelDims`` of the topology, never a strategy name.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gpupar.config import Config, layout
from gpupar.errors import UsageError
from gpupar.models import ModelSpec
from gpupar.parallel.activation_checkpoint import apply_activation_checkpointing
from gpupar.parallel.ddp import apply_data_parallel, apply_ddp
from gpupar.parallel.layer_split import apply_layer_split, parse_devices
from gpupar.parallel.pipeline import Pipeline, layer_units, split_model, traceable
from gpupar.step import StepFn, forward_backward
from gpupar.topology import Topology


@dataclass
class Parallelized:
    """The model as this rank holds it, and the function that runs one step's forward and backward."""

    model: nn.Module
    step: StepFn


def parallelize(model: nn.Module, topo: Topology, cfg: Config, spec: ModelSpec,
                inputs: torch.Tensor | None = None) -> Parallelized:
    """Place the model on this rank's device and apply the layout's strategies in order.

    ``inputs`` (a few rows of the data) let the pipeline trace a model that is not a Sequential."""
    model = model.to(topo.device)
    process = layout(cfg.parallel).process
    if process == "layer-split":
        model = apply_layer_split(model, parse_devices(cfg.parallel.devices), pipeline_units(model, spec),
                                  cfg.parallel.split_points)
    elif process == "dataparallel":
        model = apply_data_parallel(model, topo)
    ac = cfg.parallel.activation_checkpointing
    if not topo.distributed:
        model = apply_activation_checkpointing(model, ac)
        return Parallelized(model, functools.partial(forward_backward, model))
    check_same_model(model, topo)
    dims = topo.dims
    # DTensor-based strategies are imported only by the runs that use them (~0.6 s per process).
    from gpupar.parallel.fsdp import apply_fsdp
    from gpupar.parallel.tensor import apply_tp

    # 1. Pipeline split: this rank keeps its stage(s) only, as (stage index, module).
    stages = [(0, model)]
    if dims.pp > 1:
        example = None
        if traceable(model, spec.pipeline_units is not None):
            if inputs is None:
                raise UsageError(f"--pp on {type(model).__name__} (not a Sequential) traces its forward: "
                                 "parallelize needs inputs")
            example = inputs[:micro_batch_size(cfg, dims, len(inputs))].to(topo.device)
        stages = split_model(model, pipeline_units(model, spec), dims.pp, topo.pp_rank, cfg.parallel, example)
    # 2. Tensor parallel: shard each stage's layers across the "tp" ranks.
    if dims.tp > 1:
        stages = [(s, apply_tp(m, topo.mesh["tp"], tp_plan(m, dims.tp, spec))) for s, m in stages]
    # 3. Activation checkpointing per block (on the TP-sharded layers, inside the FSDP units to come).
    stages = [(s, apply_activation_checkpointing(m, ac)) for s, m in stages]
    # 4. Data parallel: BatchNorm over the global batch (--sync-bn; only in pure data-parallel
    #    layouts, where the data-parallel group is the world: preflight checks), then FSDP /
    #    HSDP where parameters are sharded, DDP for whole replicas.
    if cfg.parallel.sync_bn and dims.dp > 1:
        from gpupar.parallel.sync_bn import apply_sync_bn

        stages = [(s, apply_sync_bn(m, None, topo.device)) for s, m in stages]
    if dims.fsdp_enabled:
        stages = [(s, apply_fsdp(m, topo.dp_mesh(), cfg.parallel, cfg.train.precision)) for s, m in stages]
    elif dims.ddp_enabled:  # the layout allows DDP only without tp and pp: one stage
        stages = [(s, apply_ddp(m, topo, cfg.parallel)) for s, m in stages]

    if dims.pp > 1:
        num_stages = dims.pp * (cfg.parallel.stages_per_rank if cfg.parallel.schedule == "interleaved-1f1b" else 1)
        pipeline = Pipeline(stages, num_stages, topo.device, topo.mesh["pp"].get_group(), cfg.parallel,
                            topo.comm_device())
        return Parallelized(pipeline, pipeline.forward_backward)
    model = stages[0][1]
    return Parallelized(model, functools.partial(forward_backward, model))


def micro_batch_size(cfg: Config, dims, samples: int) -> int:
    """Rows in one pipeline micro-batch: the batch over the data-parallel ranks and --microbatches."""
    return (cfg.train.batch_size or samples) // dims.dp // (cfg.parallel.microbatches or 2 * dims.pp)


def pipeline_units(model: nn.Module, spec: ModelSpec) -> list[list[str]]:
    """The model's layers in order, as its spec names them (a Sequential's children by default)."""
    return spec.pipeline_units(model) if spec.pipeline_units else layer_units(model)


def tp_plan(model: nn.Module, tp: int, spec: ModelSpec) -> dict:
    """The model's tensor-parallel plan, from its spec (consecutive Linear pairs by default)."""
    from gpupar.parallel.tensor import auto_plan

    return spec.tp_plan(model, tp) if spec.tp_plan else auto_plan(model)


def full_state_dict(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict with the unparallelised names, on rank 0 (None elsewhere).

    Every rank must call it. DTensor shards (FSDP, HSDP, tensor parallel) are gathered with
    ``full_tensor()``, one tensor at a time, a collective over their mesh; DDP and
    DataParallel wrappers lose their ``module.`` prefix; pipeline stages each hold part of
    the names and are gathered to rank 0.
    """
    from torch.distributed.tensor import DTensor

    modules = list(model.stages) if isinstance(model, Pipeline) else [model]
    keep = topo.is_main or topo.pp_enabled  # other ranks only join the gathers
    state: dict[str, torch.Tensor] = {}
    # A 2-D (FSDP x TP) gather is two all-gathers; torch warns about that on every rank.
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)
    try:
        for module in modules:
            for name, value in getattr(module, "module", module).state_dict().items():
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                if keep:
                    state[name] = value.detach().cpu()
    finally:
        redistribute_log.setLevel(level)
    if not topo.pp_enabled:
        return state if topo.is_main else None
    return topo.merge_on_main(state)


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
