"""``gpupar.setup``: keep your own training loop, and run it under gpupar's layouts.

    gp = gpupar.setup(strategy="fsdp")            # or dp= / tp= / pp= degrees
    model, optimizer = gp.setup(model, optimizer)  # parallelize(), in its order
    loader = gp.setup_dataloader(loader)           # its batch_size is the GLOBAL batch
    ...
    gp.backward(loss)                              # and the printed loss is the global batch's

It reads torchrun's or SLURM's variables, or a process group that the user (or Ray Train)
started, and applies the CLI's own ``parallelize``; so a hand-written loop trains the model
that `gpupar train` and one device train.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.models import ModelSpec
from gpupar.ownloop import record
from gpupar.ownloop.env import topology
from gpupar.ownloop.shard import shard_loader
from gpupar.parallel.clip import clip_grad_norm_across
from gpupar.parallel.pipeline_state import is_pipeline, whole_name
from gpupar.parallelize import Parallelized, parallelize
from gpupar.training.step import call_model, loss_of, split_batch

STRATEGY_ENV = "GPUPAR_STRATEGY"  # `gpupar run --strategy` and verify hand the layout to the script here


def setup(strategy: str | None = None, *, dp: int | None = None, tp: int | None = None, pp: int | None = None,
          device: str = "auto") -> "Setup":
    """The layout for this process's part of the user's loop (see the module docstring)."""
    cfg = Config()
    cfg.train.device = device
    cfg.parallel.strategy = strategy or os.environ.get(STRATEGY_ENV) or ("ddp" if not (dp or tp or pp) else None)
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp)):
        if value is not None:
            setattr(cfg.parallel, name, value)
    if cfg.parallel.strategy is None:
        cfg.parallel.strategy = "ddp"
    return Setup(cfg.validate())


class Setup:
    """The verbs a hand-written loop needs; everything else stays the user's."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.topo = topology(cfg)
        self.parallel: Parallelized | None = None
        self.recorder = record.from_env(self.topo)

    @property
    def rank(self) -> int:
        return self.topo.rank

    @property
    def world_size(self) -> int:
        return self.topo.world_size

    @property
    def device(self) -> torch.device:
        return self.topo.device

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              example: torch.Tensor | None = None):
        """Parallelize ``model`` with gpupar's ``parallelize`` (PP -> TP -> AC -> compile -> FSDP/DDP).
        Sharded parameters are new tensors: the optimizer is rebuilt on them with the same
        class, hyperparameters and parameter groups. ``example`` (a batch of inputs) is what a
        pipeline or an automatic TP plan traces the forward on."""
        if optimizer is not None and any(optimizer.state.values()):
            raise UsageError("gp.setup(model, optimizer) must come before the optimizer's first step")
        if self.topo.pp_enabled and example is None and not isinstance(model, nn.Sequential):
            raise UsageError(f"gp.setup(model, optimizer, example=inputs) under pp: {type(model).__name__} is not an "
                             "nn.Sequential, so its stages are cut by tracing its forward on a batch of inputs")
        names = {id(p): n for n, p in model.named_parameters()}
        if self.recorder is not None:
            self.recorder.prepare(model)
        self.parallel = parallelize(model, self.topo, self.cfg, ModelSpec("user", lambda *_: model), example)
        wrapped = self.parallel.model
        if optimizer is not None:
            optimizer = _rebuild(optimizer, names, _unwrapped(wrapped))
            if self.recorder is not None:
                self.recorder.watch(wrapped, optimizer)
        return (wrapped, optimizer) if optimizer is not None else wrapped

    def setup_dataloader(self, loader):
        """This rank's shard of each of ``loader``'s global batches (shard.py)."""
        if self.topo.pp_enabled and self.topo.dp == 1:
            return loader
        return shard_loader(loader, self.topo.dp, self.topo.dp_rank)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; then ``loss`` becomes the mean over the data-parallel ranks, so
        the loop's own print shows the global batch's loss, as one device would (one small
        all-reduce on the device: no host sync)."""
        loss.backward()
        if self.topo.distributed:
            value = loss.detach()
            dist.all_reduce(value)
            value.div_(self.topo.world_size)
        if self.recorder is not None:
            self.recorder.loss(loss)

    def no_sync(self, model: nn.Module):
        """Skip the gradient reduction for accumulation steps (all but the last): DDP's
        ``no_sync``, FSDP's ``set_requires_gradient_sync(False)``. Under tp or pp alone nothing
        is reduced per micro-batch: a no-op. A pipeline's schedule reduces its sharded stages'
        gradients at the end of each ``gp.forward_backward`` itself (torch's PipelineStage):
        the sums stay right, and the whole batch in one call is what saves the reductions."""
        if is_pipeline(model):
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            return _fsdp_no_sync(model)
        if self.topo.dp > 1:
            raise UsageError(f"gp.no_sync({type(model).__name__}): not the model gp.setup returned, which reduces "
                             f"gradients over the {self.topo.dp} data-parallel ranks; pass that one")
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the WHOLE gradient, across every shard and pipeline stage, as
        ``torch.nn.utils.clip_grad_norm_`` does on one device; returns that norm (a tensor)."""
        if is_pipeline(model):
            return model.clip_grad_norm_(max_norm)
        return clip_grad_norm_across(list(model.parameters()), max_norm, None, self.topo.comm_device())

    def all_reduce(self, value: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """``value`` summed ("sum") or averaged ("mean") over the data-parallel ranks, in place
        and returned: a metric of this rank's data becomes the global batch's, on any layout.
        (Tensor- and pipeline-parallel peers hold the same batch, so each data shard counts
        once: the world's sum is divided by tp x pp.)"""
        if op not in ("mean", "sum"):
            raise UsageError(f"gp.all_reduce op {op!r}: accepted are 'mean' and 'sum'")
        if self.topo.distributed:
            dist.all_reduce(value)
            value.div_(self.topo.world_size if op == "mean" else self.topo.world_size // self.topo.dp)
        return value

    def print(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.topo.is_main:
            print(*args, **kwargs)

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        """Forward, loss and backward of one batch (``split_batch``'s rules); a pipeline runs its
        schedule here. Returns the loss (the mean over ranks)."""
        if self.parallel is not None and self.parallel.pipeline:
            loss = self.parallel.step([batch], loss_fn, contextlib.nullcontext(), None)
            return self.all_reduce(loss.detach())
        args, kwargs, target = split_batch(batch)
        loss = loss_of(loss_fn, call_model(model, args, kwargs), batch, target)
        self.backward(loss)
        return loss.detach()

    def save(self, path, state: dict) -> None:
        """``state`` (modules, optimizers, plain values) to a DCP checkpoint, resharded on load."""
        from gpupar.ownloop.store import save

        save(path, state, self.topo)

    def load(self, path, state: dict) -> dict:
        """Load ``path`` into ``state``'s modules and optimizers (any layout); returns ``state``."""
        from gpupar.ownloop.store import load

        return load(path, state, self.topo)


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _rebuild(optimizer: torch.optim.Optimizer, names: dict[int, str], model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer on the parallelised model's parameters (identical where they are).
    A pipeline rank holds its stages' parameters only: each group keeps those, and a tied
    parameter's copies in this rank's stages (named by the tie's first name, as ``names`` is)."""
    pipeline = is_pipeline(model)
    alias = model.ties.alias if pipeline else {}
    now: dict[str, list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        whole = whole_name(n) if pipeline else n
        now.setdefault(alias.get(whole, whole), []).append(p)
    groups = []
    for group in optimizer.param_groups:
        foreign = [p for p in group["params"] if id(p) not in names]
        lost = [names[id(p)] for p in group["params"] if id(p) in names and names[id(p)] not in now]
        if foreign or (lost and not pipeline):
            raise UsageError(f"the optimizer holds {len(foreign) + len(lost)} parameter(s) that are not the model's "
                             f"{lost[:3] if lost else ''}; pass the optimizer of this model")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [c for p in group["params"] if names[id(p)] in now for c in now[names[id(p)]]]})
    if all(len(g["params"]) == len(h["params"]) and all(a is b for a, b in zip(g["params"], h["params"]))
           for g, h in zip(optimizer.param_groups, groups)):
        return optimizer
    cls = type(optimizer)
    # The defaults hold what the constructor was given and some it derives (AdamW's
    # decoupled_weight_decay): pass those its signature takes; the groups carry the rest.
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if takes_any or k in accepted}
    try:
        return cls(groups, **defaults)
    except TypeError as exc:
        raise UsageError(f"gp.setup rebuilds {cls.__name__} on the sharded parameters as {cls.__name__}(param_groups, "
                         f"**defaults), which failed ({exc}); build the optimizer after "
                         "model = gp.setup(model), on model.parameters()") from None


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
