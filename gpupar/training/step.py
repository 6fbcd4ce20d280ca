"""One step's forward and backward: the ordinary one, for every layout without a pipeline.

``parallelize`` hands the training loop the function that drives its model: this one, or a
pipeline schedule's (``gpupar.parallel.pipeline.Pipeline.forward_backward``). Both take this
rank's micro-batches and leave the step's gradients in ``.grad``; the loop never asks
which layout it drives.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[list[Batch], nn.Module, contextlib.AbstractContextManager, "torch.amp.GradScaler | None"],
                  torch.Tensor]


def forward_backward(model: nn.Module, micro_batches: list[Batch], loss_fn: nn.Module,
                     amp: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; returns the (local) step loss.

    Gradients accumulate in ``.grad`` (which the previous step left as None); the optimizer
    step is the caller's, after the NaN check. The loss is a 0-dim tensor left on the
    device: reading it here (``.item()``) would make the host wait for the GPU every step.
    """
    step_loss = None
    for k, (x, y) in enumerate(micro_batches):
        # DDP all-reduces gradients inside backward; on all but the last micro-step that
        # traffic is wasted, since gradients just add up locally (no_sync).
        skip_sync = k < len(micro_batches) - 1 and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with amp:
                loss = loss_fn(model(x), y)
            # Each micro-batch is 1/grad_accum of the global batch: scale so the summed
            # gradients equal those of the mean loss over the whole batch.
            if len(micro_batches) > 1:
                loss = loss / len(micro_batches)
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss
