"""What a model's output holds: a tensor of predictions, or a tuple, dict or Hugging Face
``ModelOutput`` that carries them (``logits``) and perhaps a loss the model computed itself.
The step's loss (``training.step.loss_of``) and the checks before launch read outputs here.
"""

from __future__ import annotations

from typing import Any

import torch

from gpupar.errors import UsageError


def own_loss(output: Any) -> torch.Tensor | None:
    """The loss a model computed itself: ``output.loss`` or ``output["loss"]`` (a Hugging Face
    model given ``labels``), else None."""
    if isinstance(output, dict):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def first_output(output: Any) -> Any:
    """The predictions in an output: the tensor itself, a dict's (or ``ModelOutput``'s)
    ``logits`` or its first tensor entry, a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        return next((v for k, v in output.items() if k != "loss" and isinstance(v, torch.Tensor)), output)
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


# The dtypes a loss takes a gradient through (gpupar's losses and optimizers are real-valued).
REAL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_differentiable(output: Any, model: torch.nn.Module) -> None:
    """The loss takes its gradient through the model's output, so the output must be a real
    floating-point tensor that autograd tracks. An integer or bool one (an argmax, a comparison,
    ``.long()``), a complex one, or one cut from the graph (``.detach()``, ``torch.no_grad()``
    inside forward) was a traceback from backward on every rank, after launch.

    ``output`` must come from a forward with autograd on. A model without trainable
    parameters is left to the caller's own message (nothing to train).
    """
    loss = own_loss(output)
    t, what = (loss, "the model's own loss") if loss is not None else (first_output(output), "model output")
    if not isinstance(t, torch.Tensor):
        return
    if t.dtype not in REAL_FLOATS:
        kind = "an integer or bool output (an argmax, a comparison, .long()) has no gradient" \
            if not (t.is_floating_point() or t.is_complex()) else "gpupar's losses are real-valued"
        raise UsageError(f"{what} has dtype {t.dtype}; the loss needs a floating-point output to take a gradient "
                         f"through (accepted: float32, float64, float16, bfloat16): {kind}")
    if not t.requires_grad and any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"{what} ({t.dtype}) does not require grad: it was cut from the graph (.detach(), "
                         "torch.no_grad() in forward), so the loss cannot take a gradient through it to the parameters")
