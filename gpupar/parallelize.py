"""The one place that composes parallel strategies, in a fixed, visible order."""

from __future__ import annotations

from torch import nn

from gpupar.config import Config
from gpupar.topology import Topology


def parallelize(model: nn.Module, topo: Topology, cfg: Config) -> nn.Module:
    """Place the model on this rank's device and wrap it for the chosen strategy."""
    model = model.to(topo.device)
    return model
