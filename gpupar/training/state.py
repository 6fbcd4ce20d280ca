"""What training produces and where it stands: plain records that the loop fills, the
checkpointer saves and restores, and the job writes out. They import nothing of gpupar, so
the checkpointer and the loop can both depend on them without depending on each other."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, and the next batch to take."""

    step: int = 0
    epoch: int = 0  # the epoch to continue in (0-based)
    batch: int = 0  # batches of that epoch already consumed


@dataclass
class History:
    """One record per logged epoch: step, epoch, loss, lr, samples_per_s and val_loss when present."""

    records: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # this rank's loss at every step (read at log points)
    skipped_steps: list[int] = field(default_factory=list)  # steps dropped by --on-nan skip
    start_step: int = 0  # > 0 when resumed from a checkpoint
    wall_time: float = 0.0
    samples_per_s: float = 0.0
    grad_bytes: int = 0  # gradient bytes this rank held after its first backward (local shards)

    @property
    def final_loss(self) -> float:
        return self.records[-1]["loss"] if self.records else math.nan


@dataclass
class TrainResult:
    model: nn.Module
    history: History
