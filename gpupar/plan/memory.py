"""The memory and time model of one layout, per rank (``gpupar plan``; the model is stated in plan.py).

A rank's *local model* is what it holds: its pipeline stage (``pipeline.stage_names``), with
every layer of the tensor-parallel plan at its local width (a colwise Linear keeps
out/tp rows, a rowwise one in/tp columns and a whole bias), on the meta device. FSDP then
keeps the dim-0 chunk ``ceil(n / S)`` of each of those tensors, rank by rank.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from gpupar.config import Config
from gpupar.models.outputs import first_output
from gpupar.topology import ParallelDims

GPU_RUNTIME_BYTES = 1 << 30  # CUDA context, kernels, NCCL: outside the allocator's count
FRAGMENTATION = 0.05


def cublas_workspace_bytes() -> int:
    """cuBLAS's workspaces, inside the caching allocator's count: one per (handle, stream), and
    a step has two, the forward's thread and autograd's backward thread; plus cuBLASLt's 1 MiB.
    PyTorch's default is CUBLAS_WORKSPACE_CONFIG=:4096:8 (32 MiB) on Hopper and later and
    :4096:2:16:8 before (measured on an H200: 2 x 32 MiB + 1 MiB above the model's tensors)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config and re.fullmatch(r"(:\d+:\d+)+", config):
        sizes = [int(v) for v in config.strip(":").split(":")]
        one = sum(kib * 1024 * count for kib, count in zip(sizes[::2], sizes[1::2]))
    else:
        one = 4096 * 1024 * 8 if torch.cuda.get_device_capability()[0] >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * one + (1 << 20)


@dataclass
class Context:
    """What every layout of one config shares: the meta model, its spec, a sample, the FLOPs."""

    cfg: Config
    model: nn.Module
    spec: object
    x: torch.Tensor  # one sample's input (real, on the CPU)
    y: torch.Tensor
    batch: int
    flops: int  # one forward + backward of the whole global batch
    probes: dict = field(default_factory=dict)  # activation probes, shared by the layouts that can

    @classmethod
    def build(cls, cfg: Config) -> "Context":
        from gpupar.measure.flops import count_step_flops
        from gpupar.data import split_validation
        from gpupar.job import load_problem
        from gpupar.training.recipe import make_loss

        problem = load_problem(cfg, meta=True)
        n_train = len(split_validation(len(problem.X), cfg.data.val_fraction, cfg.train.seed)[0])
        batch = cfg.train.batch_size or n_train
        x, y = problem.X[:1].clone(), problem.y[:1].clone()
        model = problem.model.to("meta")
        loss = make_loss(cfg, problem.spec.loss)
        flops = count_step_flops(model, x.expand(batch, *x.shape[1:]), y.expand(batch, *y.shape[1:]), loss)
        return cls(cfg, model, problem.spec, x, y, batch, flops)


PROBE_ON_CPU_BYTES = 64 << 20


def whole_plan(ctx: Context, dims: ParallelDims) -> dict:
    """The whole model's TP plan, made once per tp degree (an automatic plan traces the forward)."""
    from gpupar.parallelize import tp_plan

    key = ("tp_plan", dims.tp)
    if key not in ctx.probes:
        ctx.probes[key] = tp_plan(ctx.model, dims.tp, ctx.spec, ctx.x.to(next(ctx.model.parameters()).device))
    return ctx.probes[key]


def local_model(ctx: Context, cfg: Config, dims: ParallelDims, stage: int,
                device: str = "meta") -> tuple[nn.Module, list[str]]:
    """Stage ``stage`` of the model with its TP layers at local width, and the rowwise layer names.
    On the CPU its values are uninitialised: the probe needs only what the kernels allocate."""
    from gpupar.parallel.pipeline import stage_module, stage_names
    from gpupar.parallel.tensor import by_columns, widths
    from gpupar.parallelize import pipeline_units, stage_plan

    model = ctx.model
    if dims.pp_enabled:
        units = pipeline_units(model, ctx.spec)
        names = [n for u in units for n in u]
        keep = stage_names(model, units, dims.pp, cfg.parallel)[stage]
        model = stage_module(model, keep, [n for n in names if n not in keep])
        if ctx.spec.pipeline_stage is not None:  # a stage that runs its own forward (a Hugging Face decoder's)
            model = ctx.spec.pipeline_stage(model)
    else:
        import copy

        model = copy.deepcopy(model)
    rowwise = []
    if dims.tp_enabled:
        for name, style in stage_plan(whole_plan(ctx, dims), model).items():
            layer = model.get_submodule(name)
            if widths(layer) is None:
                continue
            n_in, n_out = widths(layer)
            if by_columns(style):
                n_out //= dims.tp
            elif by_columns(style) is False:
                n_in //= dims.tp
                rowwise.append(name)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf,
                    nn.Linear(n_in, n_out, bias=layer.bias is not None, device="meta", dtype=layer.weight.dtype))
    if device != "meta":
        model = model.to_empty(device=device)
    return model, rowwise


def shard_bytes(t: torch.Tensor, shards: int, index: int) -> int:
    """Bytes of FSDP's dim-0 chunk ``index`` of ``shards`` (torch.chunk sizes: ceil(n / shards))."""
    if shards == 1 or t.dim() == 0:
        return t.numel() * t.element_size()
    n = t.shape[0]
    chunk = math.ceil(n / shards)
    rows = max(0, min(chunk, n - index * chunk))
    return rows * (t.numel() // max(n, 1)) * t.element_size()


def persistent(model: nn.Module, cfg: Config, dims: ParallelDims, shard_index: int) -> dict[str, int]:
    """Exact parameter, gradient and optimizer bytes of one rank (what memory.memory_report counts)."""
    shards = dims.dp_shard
    params = [p for p in model.parameters()]
    param_bytes = sum(shard_bytes(p, shards, shard_index) for p in params)
    grad_bytes = sum(shard_bytes(p, shards, shard_index) for p in params if p.requires_grad)
    optim = 0
    if cfg.optim.optimizer in ("adam", "adamw"):  # exp_avg + exp_avg_sq like the parameter, a float32 step
        optim = sum(2 * shard_bytes(p, shards, shard_index) + 4 for p in params if p.requires_grad)
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": optim}


def _chain_input(ctx: Context, cfg: Config, dims: ParallelDims, stage: int, mb: int, device: str) -> torch.Tensor:
    """The input of pipeline stage ``stage`` for a micro-batch of ``mb`` samples."""
    x = ctx.x.expand(mb, *ctx.x.shape[1:]).contiguous().to(device)
    with torch.no_grad():
        for s in range(stage):
            x = local_model(ctx, cfg, ParallelDims(dims.pp, 1, 1, 1), s, device)[0](x)
    return x


def activation_probe(ctx: Context, cfg: Config, dims: ParallelDims, stage: int, mb: int):
    """Probe this rank's local model, checkpointed as planned, for a micro-batch of ``mb``:
    at 2 and 4 samples, extended linearly to ``mb``, op by op (activations grow linearly with
    the samples; what does not, like the parameters' gradients and temporaries, is the
    intercept). A micro-batch of 4 or fewer is probed as is. Layouts with the same stage, TP
    degree and checkpointing share the probes."""
    from gpupar.plan.probe import StepProbe

    key = (dims.pp, n_stages(cfg, dims), stage, dims.tp, cfg.parallel.activation_checkpointing,
           cfg.parallel.split_points)
    if key not in ctx.probes:
        ctx.probes[key] = _local_probe_model(ctx, cfg, dims, stage)
    model, rowwise, device = ctx.probes[key]
    for n in ((mb,) if mb <= 4 else (2, 4)):
        if key + (n,) not in ctx.probes:
            ctx.probes[key + (n,)] = _probe_at(ctx, cfg, dims, stage, model, n, device)
    if mb <= 4:
        probe, out_bytes = ctx.probes[key + (mb,)]
        return probe, model, rowwise, out_bytes
    (a, out_a), (b, out_b) = ctx.probes[key + (2,)], ctx.probes[key + (4,)]
    if len(a.samples) != len(b.samples) or a.ops != b.ops:  # not the same ops: probe the real size
        probe, out_bytes = _probe_at(ctx, cfg, dims, stage, model, mb, device)
        return probe, model, rowwise, out_bytes
    f = (mb - 2) / 2  # steps of 2 samples from the first probe to mb

    def line(u: int, v: int) -> int:
        return int(u + (v - u) * f)

    probe = StepProbe(line(a.saved_bytes, b.saved_bytes), b.ops,
                      [(line(la, lb), ga) for (la, ga), (lb, _) in zip(a.samples, b.samples)], b.grads,
                      b.markers)
    return probe, model, rowwise, line(out_a, out_b)


def _local_probe_model(ctx: Context, cfg: Config, dims: ParallelDims, stage: int):
    from gpupar.parallel.activation_checkpoint import apply_activation_checkpointing

    model, rowwise = local_model(ctx, cfg, dims, stage)
    size = sum(t.numel() * t.element_size() for t in model.parameters())
    device = "cpu" if size <= PROBE_ON_CPU_BYTES else "meta"
    model = model.to_empty(device=device) if device == "cpu" else model
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    return model, rowwise, device


def _probe_at(ctx: Context, cfg: Config, dims: ParallelDims, stage: int, model: nn.Module, mb: int, device: str):
    """(the probe of one micro-batch of ``mb`` samples, the bytes of the stage's output)."""
    from gpupar.training.recipe import autocast_for, make_loss
    from gpupar.plan.probe import probe_step

    x = _chain_input(ctx, cfg, dims, stage, mb, device)
    if x.is_floating_point():
        x = x.detach().requires_grad_(stage > 0)
    last = stage == n_stages(cfg, dims) - 1
    loss_fn = make_loss(cfg, ctx.spec.loss) if last else (lambda out, _: out.sum())
    amp = autocast_for(torch.device("cpu"), cfg.train.precision)
    y = ctx.y.expand(mb, *ctx.y.shape[1:]).contiguous().to(device)
    from gpupar.parallel.fsdp import pick_blocks

    units = pick_blocks(model, cfg.parallel.fsdp_blocks, cfg.parallel.fsdp_min_params)
    probe = probe_step(model, x, y, loss_fn, amp, units, keep_output=not last)
    with torch.no_grad():
        out = first_output(model(x))
    return probe, out.numel() * out.element_size()


def n_stages(cfg: Config, dims: ParallelDims) -> int:
    """The pipeline's stages: pp, or pp x --stages-per-rank for the interleaved and V schedules."""
    from gpupar.parallel.pipeline import stages_per_rank

    return dims.pp * stages_per_rank(cfg.parallel) if dims.pp_enabled else 1


def _several_stages(ctx: Context, cfg: Config, dims: ParallelDims, pp_rank: int, m: int, mb: int,
                    shard_index: int, grads_scale: float) -> tuple[dict, int, int]:
    """(persistent bytes, activations, receive buffers) of a rank that
    holds several stages (interleaved, V): its stages' parameters add up, and it holds
    ``plan.schedules.peak_microbatches`` micro-batches of its share of the layers (each chunk one
    stage's saved bytes) above one chunk's own backward; each stage receives its input and its
    output's gradient per micro-batch."""
    from gpupar.parallel.pipeline import stage_owner
    from gpupar.plan.schedules import peak_microbatches

    mine = [s for s in range(n_stages(cfg, dims)) if stage_owner(s, dims.pp, cfg.parallel.schedule) == pp_rank]
    probes = [activation_probe(ctx, cfg, dims, s, mb) for s in mine]
    pers: dict[str, int] = {}
    for _, model, _, _ in probes:
        for k, v in persistent(model, cfg, dims, shard_index).items():
            pers[k] = pers.get(k, 0) + v
    chunks = peak_microbatches(cfg.parallel.schedule, dims.pp, m, pp_rank, len(mine)) * len(mine)
    saved = sum(pr[0].saved_bytes for pr in probes) / len(mine)
    activations = int(max(chunks - 1, 0) * saved) + max(pr[0].peak_bytes(grads_scale, m > 1) for pr in probes)
    ins = [activation_probe(ctx, cfg, dims, s - 1, mb)[3] if s > 0 else 0 for s in mine]
    comm = m * sum(i + pr[3] for i, pr in zip(ins, probes))
    return pers, activations, comm


def tp_activation_bytes(ctx: Context, model: nn.Module, rowwise: list[str], mb: int) -> int:
    """The largest activation a tensor-parallel all-reduce moves: a rowwise layer's output
    [mb, tokens, out_features] in fp32 (its input's gradient backward has the colwise
    partner's input width, the same in every pair gpupar builds)."""
    widths = [model.get_submodule(n).out_features for n in rowwise]
    return mb * ctx.spec.tokens_per_sample * max(widths, default=0) * 4


def predict_memory(ctx: Context, cfg: Config, dims: ParallelDims, row, device_type: str, machine) -> None:
    """Fill ``row`` with the rank-by-rank memory and the step time of this layout."""
    from gpupar.plan.buffers import fsdp_buffers, gloo_late_bytes, optimizer_temporaries

    p = cfg.parallel
    m = dims.microbatches if dims.pp_enabled else cfg.train.grad_accum
    mb = ctx.batch // (dims.dp * m)
    per_rank, worst = [], None
    probes = {}
    workspace = cublas_workspace_bytes() if device_type == "cuda" else 0  # allocated once, kept
    tp_layers = set(whole_plan(ctx, dims)) if dims.tp_enabled else set()
    for rank in range(dims.world):
        stage, shard_index = rank // (dims.dp * dims.tp), ((rank // dims.tp) % dims.dp) % dims.dp_shard
        if stage not in probes:
            probes[stage] = activation_probe(ctx, cfg, dims, stage, mb)
        probe, model, rowwise, out_bytes = probes[stage]
        pers = persistent(model, cfg, dims, shard_index)
        # Micro-batches whose activations a stage holds at once: GPipe all M, 1F1B at most p - stage.
        inflight = (m if p.schedule == "gpipe" else min(m, dims.pp - stage)) if dims.pp_enabled else 1
        # DDP's gradients are views of its buckets (counted below): the step allocates none.
        grads_scale = 0.0 if dims.ddp_enabled else 1.0 / dims.dp_shard
        # A later stage's input, received per micro-batch; its gradient, computed by backward,
        # is kept until the step's sends are waited on (the schedule's last action), so it
        # grows as backward frees the micro-batches' saved bytes.
        in_bytes = probes[stage - 1][3] if dims.pp_enabled and stage > 0 else 0
        # A stage that sends its output (not the last) keeps it until the micro-batch's backward
        # ends (the probe holds it likewise: keep_output). Sends hold outputs longer: GPipe waits
        # on its forward sends only as the schedule returns, so their work objects hold every
        # micro-batch's output (counted here, so less each micro-batch's own, `own`); 1F1B keeps
        # the work of its last warm-up send that fired (micro-batch inflight - 2) through the
        # steady phase, beyond that micro-batch's backward once m >= 2 * inflight - 1.
        sends = dims.pp_enabled and stage < dims.pp - 1
        sent, own = 0, 0
        if sends and p.schedule == "gpipe":
            sent, own = m * out_bytes, out_bytes
        elif sends and p.schedule == "1f1b" and inflight >= 2 and m >= 2 * inflight - 1:
            sent = out_bytes
        saved = probe.saved_bytes - own
        held = max((inflight - 1) * saved + (m - inflight) * in_bytes, (m - 1) * in_bytes) + sent
        activations = held + probe.peak_bytes(grads_scale, m > 1) - own
        pp_comm = m * (in_bytes + out_bytes)
        if dims.pp_enabled and n_stages(cfg, dims) > dims.pp:  # interleaved / V: the rank's stages together
            pers, activations, pp_comm = _several_stages(ctx, cfg, dims, stage, m, mb, shard_index, grads_scale)
        comm = 0
        full_local = sum(t.numel() * t.element_size() for t in model.parameters())
        if dims.ddp_enabled:  # DDP's buckets: a flat copy of every gradient
            comm = full_local
        if dims.fsdp_enabled:  # gathered units, unsharded gradients, reduce-scatter inputs, in step order
            comm = fsdp_buffers(probe, model, p, dims.dp_shard, device_type) - probe.peak_bytes(grads_scale)
        if dims.pp_enabled:  # per micro-batch: the input's receive buffer, and the output's gradient's receive
            # buffer (the last stage instead keeps every micro-batch's output, which the schedule merges)
            comm += pp_comm
        if p.cpu_offload:
            pers = {k: 0 for k in pers}
        optim_temp = optimizer_temporaries(model, cfg, dims, tp_layers, device_type, 1.0 / dims.dp_shard)
        grads_held = 0 if dims.ddp_enabled else pers["grads"]  # DDP's live in its buckets (comm)
        peak = pers["params"] + pers["optimizer"] + comm + max(activations, grads_held + optim_temp) + workspace
        # What one step allocates above what it starts with (DDP buckets and pipeline buffers are held across steps).
        transient = peak - pers["params"] - pers["optimizer"] - (0 if dims.fsdp_enabled else comm) - workspace
        late = gloo_late_bytes(model, p, dims, tp_activation_bytes(ctx, model, rowwise, mb), out_bytes) \
            if device_type == "cpu" else 0
        runtime = int(peak * FRAGMENTATION) + late + (GPU_RUNTIME_BYTES if device_type == "cuda" else 0)
        per_rank.append({"rank": rank, **pers, "activations": activations, "comm_buffers": comm, "peak": peak,
                         "transient": transient, "runtime": runtime})
        if worst is None or peak + runtime > worst["peak"] + worst["runtime"]:
            worst = per_rank[-1]
    runtime = worst["runtime"]
    row.params, row.grads, row.optimizer = worst["params"], worst["grads"], worst["optimizer"]
    row.activations, row.comm_buffers, row.runtime = worst["activations"], worst["comm_buffers"], runtime
    row.total, row.per_rank = worst["peak"] + runtime, per_rank
    row.step_s = step_time(ctx, cfg, dims, probes, m, mb, machine)
    row.samples_per_s = ctx.batch / row.step_s


def step_time(ctx: Context, cfg: Config, dims: ParallelDims, probes: dict, m: int, mb: int, machine) -> float:
    """Roofline: compute + per-op overhead (plain dispatch, and DTensor's per tensor-parallel
    layer and FSDP2's per unit, measured by plan.dispatch) + exposed communication, over (1 - bubble)."""
    from gpupar.parallelize import stage_plan

    p = cfg.parallel
    gpu = machine.device_type == "cuda"
    # On one CPU the ranks share its cores (and its matmul rate); a GPU is a rank's own.
    share = 1 if gpu else dims.world
    contention = 1.0 if gpu else max(1.0, dims.world / machine.cores)
    recompute = {"none": 0.0, "full": 1 / 3, "selective": 0.1}[p.activation_checkpointing]
    compute = ctx.flops * (1 + recompute) / dims.world / (machine.tflops * 1e12 / share)
    ops = max(pr[0].ops for pr in probes.values())
    overhead = ops * m * machine.op_overhead_s * contention
    model = probes[0][1]
    n_tensors = sum(1 for _ in model.parameters())
    overhead += 12 * n_tensors * machine.op_overhead_s * contention  # the optimizer step, tensor by tensor
    full_local = sum(t.numel() * t.element_size() for t in model.parameters())
    comm, hidden = 0.0, 0.0
    if dims.ddp_enabled:
        buckets = max(1, math.ceil(full_local / (p.ddp_bucket_mb * 2**20)))
        comm += buckets * machine.collective_time("all_reduce", dims.dp, full_local / buckets)
        hidden = 2 / 3 * compute  # overlapped with backward
    if dims.fsdp_enabled:
        from gpupar.parallel.fsdp import pick_blocks

        units = len(pick_blocks(model, p.fsdp_blocks, p.fsdp_min_params)) + 1
        overhead += m * units * machine.dispatch.get("fsdp_unit_s", 0.0) * contention
        gathers = 2 if p.reshard_after_forward else 1
        per = full_local / units
        comm += units * (gathers * machine.collective_time("all_gather", dims.dp_shard, per)
                         + machine.collective_time("reduce_scatter", dims.dp_shard, per))
        if dims.dp_replicate > 1:
            comm += units * machine.collective_time("all_reduce", dims.dp_replicate, per / dims.dp_shard)
        hidden = compute  # prefetched gathers overlap the previous unit's compute
    if dims.tp_enabled:  # two all-reduces per rowwise layer and micro-batch (forward output, backward input grad)
        rowwise = probes[0][2]
        tp_layers = len(stage_plan(whole_plan(ctx, dims), model))  # this stage's sharded layers
        overhead += m * tp_layers * machine.dispatch.get("tp_layer_s", 0.0) * contention
        for n in rowwise:
            comm += 2 * m * machine.collective_time("all_reduce", dims.tp, tp_activation_bytes(ctx, model, [n], mb))
    if dims.pp_enabled:  # each micro-batch's activation forward and its gradient backward, per boundary
        # (a rank with v stages sends across v boundaries)
        comm += 2 * m * (n_stages(cfg, dims) // dims.pp) * machine.collective_time("send_recv", 2, probes[0][3])
    exposed = max(0.0, comm - hidden) if gpu else comm  # gloo on shared CPU cores: no overlap assumed
    work = compute + overhead
    if dims.pp_enabled:  # the schedule's bubble (plan.schedules); 1F1B's where theory has no closed form
        from gpupar.plan.schedules import bubble_fraction

        bubble = bubble_fraction(p.schedule, dims.pp, m, n_stages(cfg, dims) // dims.pp)
        work = work / (1 - (bubble if bubble is not None else bubble_fraction("1f1b", dims.pp, m)))
    return work + exposed
