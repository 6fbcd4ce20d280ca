"""Layer-split model parallelism in one process: consecutive layers on different devices.

The textbook form of model parallelism (e.g. the PyTorch tutorial "Single-Machine Model
Parallel Best Practices"): layer group k lives on ``devices[k]`` and each group moves its
input to its own device before running, so activations hop from device to device in
forward and gradients hop back in backward (autograd records the copies). Only one device
works at a time; pipeline parallelism (``--pp``) is the multi-process answer to that.

The model object stays itself (no wrapper, no renamed parameters): its layers are moved and
each gets a forward pre-hook that moves its inputs. The output is moved back to the first
device, where the training loop keeps the targets.
"""

from __future__ import annotations

import torch
from torch import nn

from gpupar.devices import pick_device
from gpupar.errors import UsageError
from gpupar.parallel.pipeline import stage_starts


def parse_devices(text: str) -> list[torch.device]:
    """'cuda:0,cuda:1' -> [device('cuda:0'), device('cuda:1')], each checked to exist."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    if len(names) < 2:
        raise UsageError(f"--devices {text!r}: layer-split needs at least two devices, e.g. cpu,cpu or cuda:0,cuda:1")
    return [pick_device(name) for name in names]


def apply_layer_split(model: nn.Module, devices: list[torch.device], units: list[list[str]],
                      split_points: str | None = None) -> nn.Module:
    """Put consecutive layer groups of ``model`` (``units``, as the pipeline names them) on
    ``devices``, balanced by parameter count."""
    starts = stage_starts(model, units, len(devices), split_points, flag="--devices") + [len(units)]
    for k, device in enumerate(devices):
        for unit in units[starts[k]:starts[k + 1]]:
            for name in unit:
                layer = model.get_submodule(name).to(device)
                layer.register_forward_pre_hook(_move_inputs_to(device))
    first = devices[0]
    model.register_forward_hook(lambda module, args, output: output.to(first))
    return model


def _move_inputs_to(device: torch.device):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return hook
