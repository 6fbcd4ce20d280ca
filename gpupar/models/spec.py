"""A model's spec: what gpupar needs to know about a model, kept beside the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything model-specific that the loop, the job, bench and the strategies need.

    The rest of gpupar asks the spec and never tests a model's name or class.
    """

    name: str
    build: Callable[[int, int], nn.Module]
    """(input width, output width) -> a freshly initialised module (widths follow the data)."""
    loss: Callable[[], nn.Module] | None = None
    """The model's own loss; None = --loss, or the task's default."""
    synthetic_data: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    """(samples, seed) -> (X, y) when no --data is given; None = the classic regression example."""
    tokens_per_sample: int = 1
    """Tokens in one sample, for tokens/s (a sequence model's sequence length)."""
    tp_plan: Callable[[nn.Module, int], dict | None] | None = None
    """(whole model, tp) -> {module name: ParallelStyle}. None here, or a None plan, is the automatic
    plan that a trace of the forward proves (parallel/tensor.py auto_plan)."""
    pipeline_units: Callable[[nn.Module], list[list[str]]] | None = None
    """module -> its layers in order, each a list of module names; None = a Sequential's children."""
    pipeline_stage: Callable[[nn.Module], nn.Module] | None = None
    """A copy of the model without the other stages' modules -> the module a pipeline stage runs
    (a Hugging Face decoder's stage forward); None = the copy itself (its forward skips what it lacks)."""
