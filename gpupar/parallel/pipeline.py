"""Pipeline parallelism: each of ``pp`` ranks holds consecutive layers (a stage), and each
batch flows through the stages as ``M`` micro-batches so that stages work at the same time.

GPipe (Huang et al., 2019) runs all M forwards, then all M backwards: the idle "bubble" is
``(p - 1) / (M + p - 1)`` of the step, and every stage keeps the activations of all M
micro-batches. 1F1B (PipeDream-Flush, Narayanan et al., 2021, "Memory-Efficient
Pipeline-Parallel DNN Training") has the same bubble but alternates one forward with one
backward once the pipeline is full, so a stage keeps at most ``p`` micro-batches of
activations. Interleaved 1F1B (Narayanan et al., 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM") gives each rank ``v`` smaller stages
(round-robin), shrinking the bubble by ``v`` for more communication.

The schedules themselves are PyTorch's (``torch.distributed.pipelining``). This module
chooses where to cut the model, builds each rank's stage modules with the parameter names
of the whole model, and runs one training step, bringing the loss (computed on the last
stage only) to every rank.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from gpupar.config import ParallelConfig
from gpupar.parallel.clip import clip_grad_norm_across
from gpupar.parallel.tied import StageTies
from gpupar.errors import UsageError, first_line
from gpupar.training.step import BatchLoss, ValidTokens, pipeline_batch, pipeline_loss


def layer_units(model: nn.Module) -> list[list[str]]:
    """The model's layers in order, each a list of module names; a stage starts at a layer's first name.

    The layers are the blocks of the model's one list of blocks: the model itself when it is an
    ``nn.Sequential``, else the one ``nn.Sequential``, ``ModuleList`` or ``ModuleDict`` of two or
    more children found by looking down the model's children, one or more attributes deep (a
    wrapper's ``self.layer``, a Hugging Face decoder's ``model.layers``). Within the list each
    child with parameters starts a layer and parameter-free children (activations, dropout) join
    the layer before them, so an mlp of L Linear layers has L layers. The modules registered
    before the list, at every level on the way down to it, join the first layer and those after
    it the last (the common "embeddings, blocks, head" shape). A model with no list at all whose
    children are plain layers (the classic ``fc1 -> relu -> fc2``) is split between those
    children. Other models say their own layers through their spec
    (``gpupar.models.ModelSpec.pipeline_units``).
    """
    if isinstance(model, nn.Sequential):
        return _container_units(model, "")
    found = _find_blocks(model, "")
    if len(found) > 1:
        raise UsageError(f"--pp and layer-split cut a model along its one list of blocks; {type(model).__name__} "
                         f"has {len(found)} lists of blocks ({', '.join(found)}), so no single order of layers "
                         "(wrap its layers in one nn.Sequential, or pass a ModelSpec with pipeline_units)")
    if not found:
        children = list(model.named_children())
        if sum(1 for _, c in children if _has_params(c)) >= 2 and not any(
                any(True for _ in c.children()) for _, c in children):
            return _container_units(model, "")  # flat: fc1, relu, fc2
        raise UsageError(f"--pp and layer-split cut an nn.Sequential or a model with one list of blocks "
                         f"(nn.Sequential / nn.ModuleList) at any depth; {type(model).__name__} has no list of "
                         "blocks (wrap its layers in an nn.Sequential)")
    path = found[0]
    units = _container_units(model.get_submodule(path), path + ".")
    # Siblings before / after the list at every level from the list up to the model.
    module_path = path.split(".")
    for depth in range(len(module_path), 0, -1):
        parent_name = ".".join(module_path[:depth - 1])
        parent = model.get_submodule(parent_name) if parent_name else model
        prefix = parent_name + "." if parent_name else ""
        names = [name for name, _ in parent.named_children()]
        at = names.index(module_path[depth - 1])
        units[0][:0] = [prefix + n for n in names[:at]]
        units[-1].extend(prefix + n for n in names[at + 1:])
    return units


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and \
        sum(1 for c in module.children() if _has_params(c)) >= 2


def _find_blocks(module: nn.Module, prefix: str) -> list[str]:
    """Names of the shallowest lists of blocks under ``module``: its children's, else (none there)
    those found inside each child with parameters."""
    lists = [prefix + name for name, child in module.named_children() if _is_block_list(child)]
    if lists:
        return lists
    return [found for name, child in module.named_children() if _has_params(child)
            for found in _find_blocks(child, prefix + name + ".")]


def _container_units(container: nn.Module, prefix: str) -> list[list[str]]:
    units: list[list[str]] = []
    for name, child in container.named_children():
        if _has_params(child) or not units:
            units.append([prefix + name])
        else:
            units[-1].append(prefix + name)
    return units


def traceable(model: nn.Module, has_spec: bool) -> bool:
    """Stages of a Sequential (or a model whose spec names its layers, like the GPT, whose forward
    skips the layers a stage lacks) are copies without the other stages' modules; any other model
    is split by tracing its forward (``torch.distributed.pipelining.pipeline``)."""
    return not has_spec and not isinstance(model, nn.Sequential)


def unit_sizes(model: nn.Module, units: list[list[str]]) -> list[int]:
    return [sum(p.numel() for name in unit for p in model.get_submodule(name).parameters()) for unit in units]


def balanced_starts(sizes: list[int], stages: int) -> list[int]:
    """First layer of each stage, cutting ``sizes`` into ``stages`` contiguous runs whose largest
    parameter count is as small as possible (exact, by dynamic programming over cut points)."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(stages + 1)]  # cost[k][i]: first i layers in k stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    cost[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                c = max(cost[k - 1][j], prefix[i] - prefix[j])
                if c < cost[k][i]:
                    cost[k][i], cut[k][i] = c, j
    starts, i = [], n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def stage_starts(model: nn.Module, units: list[list[str]], stages: int, split_points: str | None,
                 flag: str = "--pp") -> list[int]:
    """Where each stage begins (layer indices): the user's --split-points, or balanced by parameters."""
    if stages > len(units):
        raise UsageError(f"{flag} asks for {stages} stages but {type(model).__name__} has only {len(units)} "
                         f"layers; use at most {len(units)} (or more --layers)")
    if split_points is None:
        return balanced_starts(unit_sizes(model, units), stages)
    parts = [p.strip() for p in split_points.split(",") if p.strip()]
    starts_by_name = {unit[0]: i for i, unit in enumerate(units)}
    names = ", ".join(unit[0] for unit in units[1:4]) + (", ..." if len(units) > 4 else "")
    if all(p.lstrip("-").isdigit() for p in parts):
        points = [int(p) for p in parts]  # layer indices
    elif all(p in starts_by_name for p in parts):
        points = [starts_by_name[p] for p in parts]  # module names, e.g. blocks.2
    else:
        bad = next(p for p in parts if p not in starts_by_name and not p.lstrip("-").isdigit())
        raise UsageError(f"--split-points {split_points!r}: {bad!r} does not start a layer of "
                         f"{type(model).__name__}; use layer indices (e.g. 2,5) or the names that start layers: {names}")
    if len(points) != stages - 1 or points != sorted(set(points)) or not all(0 < p < len(units) for p in points):
        raise UsageError(f"--split-points {split_points!r}: need {stages - 1} increasing layer indices in "
                         f"1..{len(units) - 1} or names ({names}), where stages 2..{stages} begin")
    return [0] + points


def stage_module(model: nn.Module, keep: list[str], drop: list[str]) -> nn.Module:
    """A copy of ``model`` without the modules in ``drop``: parameter names stay the whole model's."""
    stage = copy.deepcopy(model)
    for name in drop:
        parent_name, _, leaf = name.rpartition(".")
        parent = stage.get_submodule(parent_name) if parent_name else stage
        if isinstance(parent, (nn.Sequential, nn.ModuleDict, nn.ModuleList)):
            del parent._modules[leaf]  # not `del seq[i]`, which renumbers the rest
        else:
            setattr(parent, leaf, None)
    return stage


MULTI_STAGE = ("interleaved-1f1b", "interleaved-zb", "zbv", "dualpipev")
"""Schedules that give each rank several stages (--stages-per-rank; 2 in a V for zbv and dualpipev)."""
V_SHAPED = ("zbv", "dualpipev")


def stages_per_rank(options: ParallelConfig) -> int:
    return options.stages_per_rank if options.schedule in MULTI_STAGE else 1


def stage_owner(stage: int, pp: int, schedule: str) -> int:
    """The pp rank that holds ``stage``: round-robin (``s % pp``), or for the V-shaped zero-bubble
    schedules rank r holds stages r and 2p - 1 - r (the first and last stages on rank 0)."""
    if schedule in V_SHAPED:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def stage_names(model: nn.Module, units: list[list[str]], pp: int, options: ParallelConfig) -> list[list[str]]:
    """The module names each pipeline stage keeps, for all ``pp x stages_per_rank`` stages
    (stage s lives on pp rank ``stage_owner(s)``)."""
    stages = pp * stages_per_rank(options)
    starts = stage_starts(model, units, stages, options.split_points) + [len(units)]
    return [[name for unit in units[starts[s]:starts[s + 1]] for name in unit] for s in range(stages)]


def split_model(model: nn.Module, units: list[list[str]], pp: int, pp_rank: int,
                options: ParallelConfig, example: torch.Tensor | None = None,
                make_stage: Callable[[nn.Module], nn.Module] | None = None) -> list[tuple[int, nn.Module]]:
    """This rank's stages as (stage index, module): one, or ``stages_per_rank`` round-robin ones.

    With ``example`` (one micro-batch of inputs), the stages come from tracing the model's
    forward and cutting the graph at the first module of each stage (``SplitPoint.BEGINNING``);
    the stage modules keep the whole model's parameter names. Without it, each stage is a copy
    of the model without the other stages' modules, run as it is or as ``make_stage`` makes it
    (a module with its own stage forward: ``ModelSpec.pipeline_stage``)."""
    every = stage_names(model, units, pp, options)
    if example is not None:
        pipe = trace_stages(model, every, example)
        return [(s, pipe.get_stage_module(s)) for s in range(len(every))
                if stage_owner(s, pp, options.schedule) == pp_rank]
    names = [name for unit in units for name in unit]
    make = make_stage or (lambda copy: copy)
    return [(s, make(stage_module(model, keep, [n for n in names if n not in keep])))
            for s, keep in enumerate(every) if stage_owner(s, pp, options.schedule) == pp_rank]


def trace_stages(model: nn.Module, every: list[list[str]], example: torch.Tensor):
    """Trace ``model``'s forward on ``example`` and cut it where each stage's first module begins.
    The launcher runs it once, on the meta device where the model can run there, so an untraceable
    forward is one line before launch."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    split_spec = {names[0]: SplitPoint.BEGINNING for names in every[1:]}
    # torch.export prints and logs the graph it could not capture, many lines; the one-line
    # error says it. (A logging filter, not a level: torch reads the level and prints instead.)
    loggers = [logging.getLogger(name) for name in ("torch._dynamo", "torch.export", "torch._export",
                                                    "torch.fx.experimental.symbolic_shapes")]
    for log in loggers:
        log.addFilter(_drop_all)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return pipeline(model, mb_args=(example,), split_spec=split_spec)
    except Exception as exc:  # data-dependent control flow, an op torch.export cannot capture, ...
        first = first_line(exc, "")[:160]
        raise UsageError(f"--pp: cannot trace {type(model).__name__}'s forward to cut it into stages "
                         f"({type(exc).__name__}: {first}); wrap its layers in an nn.Sequential") from None
    finally:
        for log in loggers:
            log.removeFilter(_drop_all)


def _drop_all(record: logging.LogRecord) -> bool:
    return False


class Pipeline(nn.Module):
    """This rank's stage modules and the schedule that runs them.

    ``parameters()`` are this rank's (the optimizer steps those); ``forward_backward`` runs one
    batch through the whole pipeline and returns the batch's mean loss on every rank. ``ties``
    are the whole model's tied names (``tied.tied_parameters`` before the split): each stage
    keeps its own copy and ``forward_backward`` sums their gradients (``tied.StageTies``).
    """

    def __init__(self, stages: list[tuple[int, nn.Module]], num_stages: int, device: torch.device,
                 pp_group: dist.ProcessGroup, options: ParallelConfig, comm_device: torch.device,
                 microbatches: int, ties: list[list[str]] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(module for _, module in stages)
        self.stage_ids = [s for s, _ in stages]
        self.num_stages, self.device, self.pp_group, self.comm_device = num_stages, device, pp_group, comm_device
        self.microbatches = microbatches  # ParallelDims.microbatches: --microbatches, or 2 x pp
        self.schedule_name = options.schedule
        self.has_first, self.has_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        # The last stage's rank (the last pp rank; rank 0 in a V) broadcasts its loss.
        self.last_rank = dist.get_global_rank(pp_group, self.stage_owner(num_stages - 1))
        self._schedule, self._loss_fn, self._rounds, self._tokens, self._scaler = None, None, 1, None, None
        self.ties = StageTies(ties or [], list(self.stages), pp_group)
        self._round: tuple[torch.Tensor, torch.Tensor] | None = None  # the round's batch, for a loss(output, batch)

    def forward(self, *args):
        raise UsageError("a pipeline-parallel model runs its stages through a schedule, not model(inputs): "
                         "in your own loop, call gp.forward_backward(model, batch, loss_fn)")

    def _schedule_for(self, loss_fn: nn.Module):
        # Imported here: torch.distributed.pipelining pulls in torch._dynamo (~0.5 s per process).
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
        from torch.distributed.pipelining.schedules import (ScheduleDualPipeV, ScheduleInterleavedZeroBubble,
                                                            ScheduleZBVZeroBubble)

        if self._schedule is not None and self._loss_fn is loss_fn:
            return self._schedule
        m = self.microbatches

        def microbatch_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # Each micro-batch is 1/(M x rounds) of the batch and gradients add up over all the
            # backwards: scale so the sum equals the gradient of the batch's mean loss (as on one
            # device). A token loss that skips padding weighs each micro-batch by its valid tokens
            # instead: the mean over every valid token of the global batch, not a mean of means.
            tokens = self._tokens
            if isinstance(loss_fn, BatchLoss):  # the schedule cut row numbers: the user's loss gets those rows
                x, y = self._round
                loss = pipeline_loss(loss_fn, self._as_output(output), x[target], y[target]) * (1 / (m * self._rounds))
            elif tokens is None:
                loss = loss_fn(output, target) * (1 / (m * self._rounds))
            else:
                loss = loss_fn(output, tokens.usable(target)) * tokens.weight(target)
            # fp16: backward from loss x S (pipeline_scaler.PipelineGradScaler), so the gradients
            # that flow back through the stages stay above fp16's underflow.
            return self._scaler.scale(loss) if self._scaler is not None else loss

        stages = [PipelineStage(module, s, self.num_stages, self.device, group=self.pp_group)
                  for s, module in zip(self.stage_ids, self.stages)]
        # The zero-bubble schedules (Qi et al., 2024, "Zero Bubble Pipeline Parallelism") split each
        # backward into its input gradient (on the critical path) and its weight gradient (deferred
        # into the bubbles); ZBV and DualPipeV place two stages per rank in a V.
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
                "interleaved-zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble,
                "dualpipev": ScheduleDualPipeV}
        cls = kind[self.schedule_name]
        extra = {"scale_grads": False} if "scale_grads" in inspect.signature(cls.__init__).parameters else {}
        first = stages if self.schedule_name in MULTI_STAGE else stages[0]
        self._schedule, self._loss_fn = cls(first, m, loss_fn=microbatch_loss, **extra), loss_fn
        return self._schedule

    def _as_output(self, output: torch.Tensor):
        """The last stage's output as the model's own forward gives it (a Hugging Face decoder's
        stage returns its logits, the model a ``ModelOutput``), for a user's loss(output, batch)."""
        last = self.stages[self.stage_ids.index(self.num_stages - 1)]
        return last.as_output(output) if hasattr(last, "as_output") else output

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                         amp=None, scaler=None) -> torch.Tensor:
        """One batch through the schedule: it cuts the batch into --microbatches pieces, runs
        every stage's forwards and backwards in its order, and leaves this rank's stage
        gradients in ``.grad``. The loss is computed on the last stage and broadcast, so every
        rank returns the batch's mean loss. (fp32, bf16 or fp16 with ``scaler``; --grad-accum k
        runs k rounds.)"""
        schedule = self._schedule_for(loss_fn)
        # --grad-accum k: k rounds of the schedule (k x M micro-batches) before the optimizer
        # step, gradients adding up in .grad; each round's micro-batches are M more.
        self._rounds, self._scaler = len(micro_batches), scaler
        rounds = [pipeline_batch(batch, self.microbatches) for batch in micro_batches]  # (inputs, targets)
        self._tokens = ValidTokens.of(loss_fn, [y for _, y in rounds])  # over the world: a collective
        earlier = self.ties.set_aside()
        losses: list[list[torch.Tensor]] = []
        for x, y in rounds:
            losses.append(round_losses := [])  # a list per round: the schedule clears the one it is given
            args = (x,) if self.has_first else ()
            # A user's loss(output, batch) needs each micro-batch's inputs too, and the schedule
            # cuts one target tensor only: it cuts the rows' numbers, and the loss takes those rows.
            self._round = (x, y)
            target = torch.arange(len(y), device=y.device) if isinstance(loss_fn, BatchLoss) else y
            kwargs = {"target": target, "losses": round_losses} if self.has_last else {}
            # bf16/fp16: autocast around the schedule runs every stage's forward (and the loss) in
            # half precision where autocast does, with the fp32 parameters as master weights; the
            # stages send and receive the half-precision activations as they come.
            with amp if amp is not None else contextlib.nullcontext():
                schedule.step(*args, **kwargs)
        self.ties.sum_grads(earlier)  # each stage's copy of a tie holds its own uses' gradient: add them up
        # Only the last stage computed the loss: send it to the other stages of this pipeline,
        # so every rank logs, checks for NaN and averages over data-parallel ranks alike. It
        # stays a tensor (a device collective under NCCL): the loop reads it at log points only.
        loss = torch.zeros((), dtype=torch.float64, device=self.comm_device)
        if self.has_last:
            loss = torch.stack([l.detach().to(self.comm_device, torch.float64) for r in losses for l in r]).sum()
            if scaler is not None:  # the schedule kept loss x S: report the loss (S is a power of 2: exact)
                loss = loss / scaler.scale(torch.ones((), device=self.device)).to(self.comm_device, torch.float64)
        dist.broadcast(loss, src=self.last_rank, group=self.pp_group)
        return loss

    def stage_owner(self, stage: int) -> int:
        return stage_owner(stage, dist.get_world_size(self.pp_group), self.schedule_name)

    def evaluate_loss(self, samples, loss_fn: nn.Module, precision: str = "fp32",
                      batch_size: int | None = None) -> float:
        """Validation loss through the stages, the same on every rank (``pipeline_eval``)."""
        from gpupar.parallel.pipeline_eval import evaluate_pipeline

        return evaluate_pipeline(self, samples, loss_fn, precision, batch_size)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip this rank's gradients by the norm of the whole model's gradient (every stage's,
        and within a stage every TP / FSDP shard's), as ``torch.nn.utils.clip_grad_norm_`` does
        on one device: each rank's stages hold a disjoint part of the parameters, so the squared
        norms add up over the pipeline (torchtitan's ``clip_grad_norm_`` with a pp mesh). A tied
        Parameter's copies (one per stage that holds it) count once."""
        return clip_grad_norm_across(list(self.parameters()), max_norm, self.pp_group, self.comm_device,
                                     self.ties.uncounted)
