"""What a model's output holds: a tensor of predictions, or a tuple, dict or Hugging Face
``ModelOutput`` that carries them (``logits``) and perhaps a loss the model computed itself.
The step's loss (``training.step.loss_of``) and the checks before launch read outputs here.
"""

from __future__ import annotations

from typing import Any

import torch


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
