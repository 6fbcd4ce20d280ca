"""What gpupar verify needs inside a training run: the rounding-noise reference's one-ulp
nudge, dropout switched off on request, and the step-1 gradients of the whole model.

A parallel layout changes only the order of floating-point sums (a gradient all-reduce adds
W per-rank means, tensor parallel splits every inner product), so its trajectory differs
from one device's by rounding, which a chaotic run then amplifies. verify measures how much
this run amplifies rounding by training a second single-device reference whose initial
weights are moved by one unit in the last place (ulp) each, and judges the strategy against
that gap. The step-1 gradients are compared before anything can amplify a difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gpupar.parallelize import full_tensors
from gpupar.training.step import StepFn
from gpupar.topology import Topology

RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@torch.no_grad()
def nudge_weights(model: nn.Module) -> None:
    """Move every floating-point parameter one ulp towards +inf: a perturbation of the size of
    one fp32 rounding, in every weight, before the first step."""
    for p in model.parameters():
        if p.is_floating_point():
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))


def random_layers(model: nn.Module) -> list[str]:
    """Names of the layers that draw random numbers in training (dropout and its kin)."""
    return [name for name, m in model.named_modules() if isinstance(m, RANDOM_LAYERS) and m.p > 0]


def batch_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers (their statistics come from the batch a rank sees)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, RANDOM_LAYERS):
            m.p = 0.0


def record_first_grads(step: StepFn, model: nn.Module, topo: Topology, path: Path) -> StepFn:
    """``step``, which after its first call writes the whole model's gradients to ``path``
    (rank 0). Every rank joins the gathers once; later steps run ``step`` alone."""
    done = False

    def first(micro_batches, loss_fn, amp, scaler):
        nonlocal done
        loss = step(micro_batches, loss_fn, amp, scaler)
        if not done:
            done = True
            grads = full_grads(model, topo)
            if grads is not None:
                from gpupar.weights import save_weights

                save_weights(grads, path)
        return loss

    return first


def full_grads(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor] | None:
    """The gradients under the unparallelised parameter names, in fp32, on rank 0 (None elsewhere).
    A tied parameter is named under each of its names: one device's one tensor, a pipeline's
    copies in the stages that hold them (each must carry the summed gradient)."""
    grads = full_tensors(model, topo, lambda module: ((n, p.grad)
                                                      for n, p in module.named_parameters(remove_duplicate=False)))
    return None if grads is None else {name: g.float().clone() for name, g in grads.items()}
