"""The one place that composes parallel strategies, in a fixed, visible order."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.parallel.ddp import apply_data_parallel, apply_ddp
from gpupar.parallel.fsdp import apply_fsdp, fsdp_mesh
from gpupar.topology import Topology


def parallelize(model: nn.Module, topo: Topology, cfg: Config) -> nn.Module:
    """Place the model on this rank's device and wrap it for the chosen strategy."""
    model = model.to(topo.device)
    if topo.distributed:
        check_same_model(model, topo)
    strategy = cfg.parallel.strategy
    if strategy in ("fsdp", "hsdp"):
        return apply_fsdp(model, fsdp_mesh(topo, cfg.parallel), cfg.parallel, cfg.train.precision)
    if strategy == "ddp":
        return apply_ddp(model, topo, cfg.parallel)
    if strategy == "dp":
        return apply_data_parallel(model, topo)
    return model


def check_same_model(model: nn.Module, topo: Topology) -> None:
    """Pre-flight: all ranks must hold the same parameter names, shapes and dtypes.

    A mismatch (say, a rank that read different data and built a different input layer)
    would otherwise surface as a hang or a cryptic size error inside a collective.
    """
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    everyone: list = [None] * topo.world_size
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diff = next(((a, b) for a, b in zip(everyone[0], theirs) if a != b), (everyone[0][-1:], theirs[-1:]))
            raise UsageError(f"rank {rank} built a different model than rank 0: {diff[1]} vs {diff[0]}")
