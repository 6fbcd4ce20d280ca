"""One step's forward and backward: the ordinary one, for every layout without a pipeline.

``parallelize`` hands the training loop the function that drives its model: this one, or a
pipeline schedule's (``gpupar.parallel.pipeline.Pipeline.forward_backward``). Both take this
rank's micro-batches and leave the step's gradients in ``.grad``; the loop never asks
which layout it drives.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from gpupar.errors import UsageError
from gpupar.models.outputs import first_output, own_loss

Batch = Any  # a collated batch: a tensor, a tuple or list, a dict, or a nesting of them
StepFn = Callable[[list[Batch], nn.Module, contextlib.AbstractContextManager, "torch.amp.GradScaler | None"],
                  torch.Tensor]


def split_batch(batch: Batch) -> tuple[tuple, dict, Any]:
    """How a batch feeds the model: (positional arguments, keyword arguments, target).

    - ``(x, y)``, the classic pair: ``model(x)`` (``model(*x)`` when ``x`` is itself a tuple or
      list: several inputs), against target ``y``;
    - a dict with an ``"x"`` key: ``model(batch["x"])`` against ``batch.get("y")``;
    - any other dict (a Hugging Face batch: ``input_ids``, ``attention_mask``, ``labels``): its
      entries are keyword arguments, and the target is ``batch.get("labels")``;
    - a tuple or list of another length: positional arguments, no target;
    - a tensor: the one input, no target (the loss comes from the output, or the user's loss).
    """
    if isinstance(batch, dict):
        if "x" in batch:
            return _as_args(batch["x"]), {}, batch.get("y")
        return (), dict(batch), batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return _as_args(batch[0]), {}, batch[1]
        return tuple(batch), {}, None
    return (batch,), {}, None


def pipeline_batch(batch, microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule feeds one tensor to the first stage and one target to the loss, in equal
    micro-batches (which keep the pipeline's gradient equal to the whole batch's)."""
    args, kwargs, target = split_batch(batch)
    if kwargs or len(args) != 1 or not all(isinstance(t, torch.Tensor) for t in (*args, target)):
        kind = f"a dict of {', '.join(map(str, batch))}" if isinstance(batch, dict) else type(batch).__name__
        raise UsageError(f"--pp feeds (inputs, targets) tensors through its stages; this batch is {kind} "
                         "(pass (input_ids, labels) pairs, or use fsdp/ddp/tp for keyword batches)")
    if len(args[0]) % microbatches:
        raise UsageError(f"--microbatches {microbatches} must divide each rank's batch of {len(args[0])} "
                         "samples (--batch-size / --dp)")
    return args[0], target


def pipeline_loss(loss_fn: Callable, output: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss on a pipeline's last stage: a user's ``loss(output, batch)`` gets the
    micro-batch ``(inputs, target)`` as it would on one device, not the target alone (under
    which ``x, y = batch`` splits the target's rows, silently wrong); a criterion gets
    ``(prediction, target)``."""
    if isinstance(loss_fn, BatchLoss):
        return loss_fn(output, (inputs, target))
    return loss_fn(output, target)


def _as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def call_model(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)``, the keyword arguments matched to its forward's signature: a
    dict batch may carry entries the forward does not take (``labels`` for a model without its
    own loss, an index, the raw text); those stay in the batch, for the target and the loss."""
    if kwargs:
        names = _keywords(model)
        if names is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in names}
    return model(*args, **kwargs)


_KEYWORDS: dict[type, frozenset[str] | None] = {}


def _keywords(model: nn.Module) -> frozenset[str] | None:
    """The keyword names the model's forward takes (a wrapper's: the wrapped module's); None
    when it takes ``**kwargs``. Once per class: the step calls it every micro-batch."""
    inner = getattr(model, "module", model)  # DDP and DataParallel keep the user's module here
    key = type(inner)
    if key not in _KEYWORDS:
        params = inspect.signature(inner.forward).parameters.values()
        _KEYWORDS[key] = None if any(p.kind is p.VAR_KEYWORD for p in params) else \
            frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return _KEYWORDS[key]


class BatchLoss:
    """A user's ``loss(output, batch)``: it sees the model's whole output (a tensor, tuple, dict
    or ``ModelOutput``) and the batch as collated, so it can read masks, weights or several
    targets. A torch criterion (an ``nn.Module`` such as ``nn.MSELoss()``) is not wrapped: it
    gets ``(prediction, target)`` as it expects."""

    def __init__(self, fn: Callable[[Any, Batch], torch.Tensor]):
        self.fn = fn

    def __call__(self, output: Any, batch: Batch) -> torch.Tensor:
        return self.fn(output, batch)


def loss_of(loss_fn: Callable, output: Any, batch: Batch, target: Any) -> torch.Tensor:
    """The step's loss, in this order: the user's ``loss(output, batch)``; the model's own loss;
    the configured criterion on the first output against the target."""
    if isinstance(loss_fn, BatchLoss):
        return loss_fn(output, batch)
    own = own_loss(output)
    if own is not None:
        return own
    return loss_fn(first_output(output), target)


def forward_backward(model: nn.Module, micro_batches: list[Batch], loss_fn: nn.Module,
                     amp: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; returns the (local) step loss.

    Gradients accumulate in ``.grad`` (which the previous step left as None); the optimizer
    step is the caller's, after the NaN check. The loss is a 0-dim tensor left on the
    device: reading it here (``.item()``) would make the host wait for the GPU every step.
    """
    parts = [split_batch(batch) for batch in micro_batches]
    tokens = ValidTokens.of(loss_fn, [target for _, _, target in parts])
    step_loss = None
    for k, (batch, (args, kwargs, target)) in enumerate(zip(micro_batches, parts)):
        # DDP all-reduces gradients inside backward; on all but the last micro-step that
        # traffic is wasted, since gradients just add up locally (no_sync).
        skip_sync = k < len(micro_batches) - 1 and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext(), _sharded_parameter_use():
            with amp:
                loss = loss_of(loss_fn, call_model(model, args, kwargs), batch,
                               target if tokens is None else tokens.usable(target))
            # Each micro-batch is 1/grad_accum of the global batch (or its share of the valid
            # tokens): scale so the summed gradients equal those of the mean over the whole batch.
            if tokens is not None:
                loss = loss * tokens.weight(target)
            elif len(micro_batches) > 1:
                loss = loss / len(micro_batches)
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss


@contextlib.contextmanager
def _sharded_parameter_use():
    """A loss that reads parameters (a weight penalty over ``model.parameters()``) meets FSDP's
    and TP's DTensor shards in its forward or its backward: one line, not a rank's traceback."""
    try:
        yield
    except RuntimeError as exc:
        if "mixed torch.Tensor and DTensor" not in str(exc):
            raise
        raise UsageError("the loss mixes a tensor with a sharded parameter (under fsdp and tp parameters are "
                         "DTensor shards): use the optimizer's weight_decay, or p.full_tensor() of each DTensor "
                         "parameter in your loss") from None


class ValidTokens:
    """The valid tokens of a step: every target that is not the loss's ``ignore_index``, summed
    over this rank's micro-batches and all-reduced over the world (one collective, no host
    sync). ``weight(target)`` is what a micro-batch's mean loss over ``target`` is scaled by,
    so that the summed (and data-parallel averaged) gradients are those of the mean over the
    whole global batch (the pipeline's schedule, which cuts its own micro-batches, weighs each
    one the same way).

    Without it (None), micro-batches weigh equally, 1/M each. A token loss that skips padding
    (targets equal to its ``ignore_index``, -100) averages over a different number of valid
    tokens in each micro-batch and on each rank: a mean of means would over-weigh the short
    ones (huggingface/transformers#34191). Micro-batch k weighs n_k * world / N, with n_k its
    valid tokens and N their sum over every micro-batch of every rank (one all-reduce of a
    count). Over the world each data shard is counted once per tensor-parallel peer, as the
    gradient average counts it, so the product is the global token mean.
    """

    def __init__(self, ignore: int, total: torch.Tensor, world: int):
        self.ignore, self.total, self.world = ignore, total, world

    @classmethod
    def of(cls, loss_fn: Callable, targets: list) -> ValidTokens | None:
        """None where micro-batches weigh equally: no token loss with an ``ignore_index``, the
        user's own loss, or targets that are not integer tensors."""
        ignore = getattr(loss_fn, "ignore_index", None)
        if not isinstance(ignore, int) or isinstance(loss_fn, BatchLoss):
            return None
        if not all(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in targets):
            return None
        total = torch.stack([(t != ignore).sum() for t in targets]).sum().to(torch.float32)
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(total)
        return cls(ignore, total, world)

    def weight(self, target: torch.Tensor) -> torch.Tensor:
        return (target != self.ignore).sum().to(torch.float32) * self.world / self.total.clamp(min=1)

    def usable(self, target: torch.Tensor) -> torch.Tensor:
        """``target``, or, where it has no valid token at all (a micro-batch of padding only),
        the same with its first token made a real class: the mean over no token is 0/0, a NaN
        in the forward and in the backward that its weight of 0 cannot cancel. The weight
        stays 0, so the micro-batch adds nothing, as it adds nothing to the one-device mean."""
        if target.numel() == 0:
            return target
        flat = target.reshape(-1).clone()
        real = torch.full_like(flat[0], 1 if self.ignore == 0 else 0)
        flat[0] = torch.where((target != self.ignore).any(), flat[0], real)
        return flat.view_as(target)
