"""The one topology object: who this process is, on which device, and how ranks are arranged.

It is built once per process (``Topology.single`` or ``Topology.from_env`` after the
launcher started the ranks), validated, and passed explicitly to the strategies and the
training loop. Nothing reaches for it through a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Topology:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dp: int = 1
    """Data-parallel degree: how many ranks split each global batch."""

    @classmethod
    def single(cls, device: torch.device) -> "Topology":
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        """This rank's position along the data-parallel dimension."""
        return self.rank % self.dp if self.dp > 1 else 0


def launched_by_torchrun() -> bool:
    """True inside a rank started by torchrun / TorchElastic (it sets these variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
