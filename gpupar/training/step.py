"""One step's forward and backward: the ordinary one, for every layout without a pipeline.

``parallelize`` hands the training loop the function that drives its model: this one, or a
pipeline schedule's (``gpupar.parallel.pipeline.Pipeline.forward_backward``). Both take this
rank's micro-batches and leave the step's gradients in ``.grad``; the loop never asks
which layout it drives.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

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


def _as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


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
    step_loss = None
    for k, batch in enumerate(micro_batches):
        args, kwargs, target = split_batch(batch)
        # DDP all-reduces gradients inside backward; on all but the last micro-step that
        # traffic is wasted, since gradients just add up locally (no_sync).
        skip_sync = k < len(micro_batches) - 1 and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with amp:
                loss = loss_of(loss_fn, model(*args, **kwargs), batch, target)
            # Each micro-batch is 1/grad_accum of the global batch: scale so the summed
            # gradients equal those of the mean loss over the whole batch.
            if len(micro_batches) > 1:
                loss = loss / len(micro_batches)
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss
