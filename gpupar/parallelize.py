"""The one place that composes parallel strategies, in a fixed, visible order, and checks them
in that same order before launch.

Order (as torchtitan's ``parallelize`` with its pipeline split):

1. the pipeline split: this rank keeps its stage or stages;
2. tensor parallel on each stage (it rewrites layers into sharded DTensor layers; planning it
   per stage means a colwise/rowwise pair never straddles two stages);
3. activation checkpointing per block;
4. compile (``--compile``, and ``--cuda-graphs`` across ranks);
5. data parallel over the data-parallel mesh dimensions: SyncBatchNorm where asked, then FSDP
   or HSDP wherever parameters are sharded, DDP for whole replicas.

One-process layouts (layer-split over devices, DataParallel) place the model first. Each
step reads the resolved ``ParallelDims``; the strategy name was translated once, in
``config.layout``. ``check_layout`` walks the same numbered steps on the meta-device model
before any rank starts, so a layout that cannot work is one line and exit 2.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.models import ModelSpec
from gpupar.models.hf import adopt
from gpupar.parallel import tied
from gpupar.parallel.activation_checkpoint import apply_activation_checkpointing
from gpupar.parallel.ddp import apply_data_parallel, apply_ddp
from gpupar.parallel.layer_split import apply_layer_split, parse_devices
from gpupar.parallel.pipeline import (Pipeline, layer_units, split_model, stage_module, stage_names, stage_starts,
                                      stages_per_rank, trace_stages, traceable)
from gpupar.topology import ParallelDims, Topology
from gpupar.training.step import StepFn, forward_backward


@dataclass
class Parallelized:
    """The model as this rank holds it, the function that runs one step's forward and
    backward, and what the loop needs to know of the layout."""

    model: nn.Module
    step: StepFn
    pipeline: bool = False
    """The step is a pipeline schedule's (it cuts the micro-batches itself)."""
    devices: tuple[torch.device, ...] = ()
    """The devices this rank's parameters live on (several under layer-split)."""


def parallelize(model: nn.Module, topo: Topology, cfg: Config, spec: ModelSpec,
                inputs: torch.Tensor | None = None) -> Parallelized:
    """Place the model on this rank's device and apply the layout's strategies in order.

    ``inputs`` (a few rows of the data) let the pipeline trace a model that is not a Sequential."""
    dims, spec = topo.dims, adopt(spec, model)
    model = model.to(topo.device)
    if dims.process == "layer-split":
        model = apply_layer_split(model, parse_devices(cfg.parallel.devices), pipeline_units(model, spec),
                                  cfg.parallel.split_points)
    elif dims.process == "dataparallel":
        model = apply_data_parallel(model, topo)
    if topo.distributed:
        check_same_model(model, topo)
    stages = [(0, model)]
    # The tensor-parallel plan is made (and proven) on the whole model; each stage applies its part.
    plan = tp_plan(model, dims.tp, spec, _one_row(inputs, topo.device)) if dims.tp_enabled else {}
    # 1. Pipeline split: this rank keeps its stage(s) only, as (stage index, module); a tie across
    #    stages becomes one copy per stage, their gradients summed after each backward (tied.py).
    ties = tied.tied_parameters(model)
    if dims.pp_enabled:
        example = None
        if traceable(model, spec.pipeline_units is not None):
            if inputs is None:
                raise UsageError(f"--pp on {type(model).__name__} (not a Sequential) traces its forward: "
                                 "parallelize needs inputs")
            example = inputs[:micro_batch_size(cfg, dims, len(inputs))].to(topo.device)
        stages = split_model(model, pipeline_units(model, spec), dims.pp, topo.pp_rank, cfg.parallel, example,
                             spec.pipeline_stage)
    # 2. Tensor parallel: shard each stage's layers across the "tp" ranks (DTensor strategies
    #    are imported only by the runs that use them: ~0.6 s per process).
    if dims.tp_enabled:
        from gpupar.parallel.tensor import apply_tp, plain_linears

        # A traced stage's planned layers become nn.Linear again (same parameters) first.
        planned = [(s, m, stage_plan(plan, m)) for s, m in stages]
        stages = [(s, apply_tp(plain_linears(m, part), topo.mesh["tp"], part)) for s, m, part in planned]
    # 3. Activation checkpointing per block (on the TP-sharded layers, inside the FSDP units to come).
    stages = [(s, apply_activation_checkpointing(m, cfg.parallel.activation_checkpointing)) for s, m in stages]
    # 4. Compile each stage in place (its state-dict names stay): before data parallel wraps it.
    whole_step = captures_whole_step(cfg, dims)
    for _, m in stages:
        compile_in_place(m, cfg, whole_step)
    # 5. Data parallel: BatchNorm over the global batch (--sync-bn; only in pure data-parallel
    #    layouts, where the data-parallel group is the world: check_layout says so), then
    #    FSDP / HSDP where parameters are sharded, DDP for whole replicas.
    if cfg.parallel.sync_bn and dims.dp_enabled:
        from gpupar.parallel.sync_bn import apply_sync_bn

        stages = [(s, apply_sync_bn(m, None, topo.device)) for s, m in stages]
    if dims.fsdp_enabled:
        from gpupar.parallel.fsdp import apply_fsdp

        stages = [(s, apply_fsdp(m, topo.dp_mesh(), cfg.parallel, cfg.train.precision)) for s, m in stages]
    elif dims.ddp_enabled:  # the layout allows DDP only without tp and pp: one stage
        stages = [(s, apply_ddp(m, topo, cfg.parallel)) for s, m in stages]

    devices = tuple(sorted({p.device for _, m in stages for p in m.parameters()}, key=str))
    if dims.pp_enabled:
        num_stages = dims.pp * stages_per_rank(cfg.parallel)
        pipeline = Pipeline(stages, num_stages, topo.device, topo.mesh["pp"].get_group(), cfg.parallel,
                            topo.comm_device(), dims.microbatches, ties)
        return Parallelized(pipeline, pipeline.forward_backward, True, devices)
    model = stages[0][1]
    return Parallelized(model, functools.partial(forward_backward, model), False, devices)


def check_layout(model: nn.Module, dims: ParallelDims, cfg: Config, spec: ModelSpec,
                 example: torch.Tensor) -> None:
    """The checks of ``parallelize``'s steps, in its order, on the model as built for the checks
    before launch (on the meta device where it can be). ``example`` is one micro-batch of
    inputs (zeros of the data's shape): a pipeline that traces the forward traces it on them."""
    spec = adopt(spec, model)
    if dims.process == "layer-split":
        if spec.pipeline_stage is not None:  # its stages run their own forward, not the model's
            raise UsageError(f"--strategy layer-split on {type(model).__name__}: its decoder layers need the mask "
                             "and positions its forward makes, which gpupar remakes in pipeline stages only; use --pp")
        devices = parse_devices(cfg.parallel.devices)
        stage_starts(model, pipeline_units(model, spec), len(devices), cfg.parallel.split_points, flag="--devices")
    # 1. Pipeline split: the stages against the model's layers, the trace.
    stages, traced = [model], None  # traced: the stages cut from the traced forward, where they are
    if dims.pp_enabled:
        units = pipeline_units(model, spec)
        names = [name for unit in units for name in unit]
        every = stage_names(model, units, dims.pp, cfg.parallel)
        stages = [stage_module(model, keep, [n for n in names if n not in keep]) for keep in every]
        if traceable(model, spec.pipeline_units is not None):  # its stages will be cut from its traced forward
            traced = trace_stages(model, every, example)
    # 2. Tensor parallel: divisibility and ties of every sharded layer of every stage (and, with
    #    a pipeline, of a tie's copies in different stages).
    if dims.tp_enabled:
        from gpupar.parallel.tensor import check_tp_divisible, plain_linears

        plan = tp_plan(model, dims.tp, spec, None if example is None else example[:1])
        if dims.pp_enabled:
            tied.check_pp(model, plan)
        for s, stage in enumerate(stages):
            check_tp_divisible(stage, stage_plan(plan, stage), dims.tp)
            tied.check_tp(stage, stage_plan(plan, stage))
            if traced is not None:  # each planned layer of a traced stage must be one linear
                plain_linears(traced.get_stage_module(s), stage_plan(plan, stage))
    # 4. Compile: a pipeline's stages are not compiled.
    if (cfg.train.compile or cfg.train.cuda_graphs) and dims.pp_enabled:
        raise UsageError("--compile / --cuda-graphs with --pp: pipeline stages are not compiled yet")
    # 5. Data parallel: SyncBatchNorm needs the data-parallel group to be the world.
    if cfg.parallel.sync_bn and (dims.tp_enabled or dims.pp_enabled):
        raise UsageError("--sync-bn with --tp/--pp: only pure data-parallel layouts (ddp, fsdp, hsdp) sync BatchNorm yet")


def captures_whole_step(cfg: Config, dims: ParallelDims) -> bool:
    """``--cuda-graphs`` on one process and one device captures the whole step (training/graphs.py);
    across ranks, or over several devices, it is compile's ``reduce-overhead`` mode."""
    return cfg.train.cuda_graphs and dims.world == 1 and dims.process != "layer-split"


def compile_in_place(model: nn.Module, cfg: Config, whole_step: bool) -> None:
    """``nn.Module.compile`` keeps the module (and its state-dict names) and compiles its
    forward; backward follows through AOTAutograd. ``--cuda-graphs`` without a whole-step
    capture is compile's ``reduce-overhead`` mode, which records the forward and backward
    kernels as CUDA graphs. Either way the shapes must stay the same: full batches, or
    batches that divide the data."""
    graphs_by_compile = cfg.train.cuda_graphs and not whole_step
    if cfg.train.compile or graphs_by_compile:
        model.compile(mode="reduce-overhead" if graphs_by_compile else None)


def micro_batch_size(cfg: Config, dims: ParallelDims, samples: int) -> int:
    """Rows in one pipeline micro-batch: the batch over the data-parallel ranks, --grad-accum's
    rounds and the micro-batches."""
    return (cfg.train.batch_size or samples) // dims.dp // cfg.train.grad_accum // dims.microbatches


def pipeline_units(model: nn.Module, spec: ModelSpec) -> list[list[str]]:
    """The model's layers in order, as its spec names them (a Sequential's children by default)."""
    return spec.pipeline_units(model) if spec.pipeline_units else layer_units(model)


def tp_plan(model: nn.Module, tp: int, spec: ModelSpec, example: torch.Tensor | None) -> dict:
    """The whole model's tensor-parallel plan: its spec's (the GPT's, a Hugging Face model's own),
    else the automatic plan that a trace of the forward on ``example`` (one row) proves."""
    from gpupar.parallel.tensor import auto_plan

    plan = spec.tp_plan(model, tp) if spec.tp_plan else None
    if plan is not None:
        return plan
    if example is None:
        raise UsageError(f"--tp on {type(model).__name__}: the automatic plan traces the forward on an input "
                         "row, and none was given (gp.setup(model, optimizer, example=inputs))")
    return auto_plan(model, example)


def stage_plan(plan: dict, stage: nn.Module) -> dict:
    """The part of the whole model's plan that a pipeline stage holds (names stay the model's)."""
    names = {name for name, _ in stage.named_modules()}
    return {name: style for name, style in plan.items() if name in names}


def _one_row(inputs: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if inputs is None else inputs[:1].to(device)


def full_state_dict(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict with the unparallelised names, on rank 0 (None elsewhere).
    Every rank must call it (see ``full_tensors``)."""
    return full_tensors(model, topo, lambda module: module.state_dict().items())


def full_tensors(model: nn.Module, topo: Topology, named) -> dict[str, torch.Tensor] | None:
    """``named(module)``'s (name, tensor) pairs of the whole model, whole and on the CPU, on
    rank 0 (None elsewhere); None tensors are left out. Every rank must call it.

    DTensor shards (FSDP, HSDP, tensor parallel) are gathered with ``full_tensor()``, one
    tensor at a time, a collective over their mesh; DDP and DataParallel wrappers lose their
    ``module.`` prefix; pipeline stages each hold part of the names and are gathered to rank 0.
    """
    from torch.distributed.tensor import DTensor

    modules = list(model.stages) if isinstance(model, Pipeline) else [model]
    keep = topo.is_main or topo.pp_enabled  # other ranks only join the gathers
    out: dict[str, torch.Tensor] = {}
    # A 2-D (FSDP x TP) gather is two all-gathers; torch warns about that on every rank.
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)
    try:
        for module in modules:
            for name, value in named(getattr(module, "module", module)):
                if value is None:
                    continue
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                if keep:
                    out[name] = value.detach().cpu()
    finally:
        redistribute_log.setLevel(level)
    if not topo.pp_enabled:
        return out if topo.is_main else None
    return topo.merge_on_main(out)


def rank0_initial_state(model: nn.Module, topo: Topology) -> nn.Module:
    """Every rank starts from rank 0's parameter and buffer values, as DDP does, before any
    strategy cuts the model: a factory that initialises per rank (its own seed, a random
    source) would otherwise train, under FSDP, TP or PP, a mix of the ranks' inits without a
    word. gpupar train and gpupar.train call it; ``gp.setup`` does not (the user's loop is
    the user's, and gpupar verify names a per-rank seed there)."""
    if topo.distributed:
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                dist.broadcast(tensor, src=0)
    return model


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
