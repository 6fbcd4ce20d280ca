"""The recipe of a run: its loss, optimizer, learning-rate schedule and autocast, from the
config alone. The loop, the sweep, the bench and the planner build them here, so every
command trains with the same ones.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Callable

import torch
from torch import nn

from gpupar.config import Config
from gpupar.models.builtin import import_callable
from gpupar.training.step import BatchLoss

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss, "cross-entropy": nn.CrossEntropyLoss,
}


def make_loss(cfg: Config, model_loss: Callable[[], nn.Module] | None = None) -> nn.Module | BatchLoss:
    """--loss package.module:function (called as function(output, batch)), else the model's own
    criterion (``ModelSpec.loss``), else --loss by name, else the task's default. Whatever it is,
    a loss the model computes itself (``output.loss``) comes first unless --loss names a function
    (``training.step.loss_of``)."""
    if cfg.train.loss and ":" in cfg.train.loss:
        return BatchLoss(import_callable(cfg.train.loss, "--loss", "function"))
    if model_loss is not None:
        return model_loss()
    name = cfg.train.loss or ("cross-entropy" if cfg.data.task == "classification" else "mse")
    return LOSSES[name]()


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD; fused (one kernel per device and step) unless --optimizer-impl default.

    The fused kernels are faster on CPU and CUDA and take a ``found_inf`` flag on the device,
    so ``--on-nan skip`` and fp16 loss scaling skip a step without a host sync. They round a few
    ulp apart from torch's default (for-loop on CPU, foreach on CUDA): ``--optimizer-impl
    default`` gives the plain torch loop's bits.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())  # loaded only if used
    kinds = [(isinstance(p, dtensor), p.is_floating_point(), p.device.type) for p in params]
    fused = {"fused": True} if fused_kernels(cfg, kinds) else {}
    lr = o.lr
    if fused and cfg.train.cuda_graphs and o.optimizer != "sgd" and all(p.is_cuda for p in params):
        # graphs.py captures the step: the learning rate must be a tensor the scheduler fills.
        # The warm-up steps run uncaptured on purpose; torch's warning about that is noise here.
        fused["capturable"], lr = True, torch.tensor(o.lr, device=params[0].device)
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay, **fused)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **fused)
    return torch.optim.SGD(params, lr=lr, weight_decay=o.weight_decay, **fused)


def fused_kernels(cfg: Config, params: list[tuple[bool, bool, str]]) -> bool:
    """Whether the optimizer runs torch's fused kernels, each parameter given as (is a DTensor,
    is floating point, device type); ``gpupar plan`` asks the same of the model it predicts.
    They take floating-point tensors on CPU and CUDA, and DTensor parameters only when all of
    them are (a tensor-parallel stage beside whole embeddings mixes the two, and the fused op
    refuses the mix): such a model keeps torch's default implementation."""
    dtensors = sum(is_dtensor for is_dtensor, _, _ in params)
    return cfg.optim.optimizer_impl == "fused" and bool(params) and dtensors in (0, len(params)) and \
        all(floating and device in ("cpu", "cuda") for _, floating, device in params)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Linear warm-up to --lr, then constant, cosine or linear decay to 0. None when constant."""
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.lr_schedule
    if kind == "constant" and warmup == 0:
        return None

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device, precision: str, cache: bool = True):
    """Autocast context for bf16/fp16; a no-op for fp32. A captured step (graphs.py) needs
    ``cache=False``: the cast cache would keep casts made while the graph was recorded."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
