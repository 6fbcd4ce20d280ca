"""The NaN/Inf guard of the training loop, on the device: no host sync between log points.

Reading a GPU tensor on the host (``.item()``, ``float()``, ``if t:``) waits until the GPU has
finished everything queued before it, so the CPU cannot queue the next step meanwhile; for a
small, launch-bound model that can double the step time. So each step's loss and its
NaN/Inf flags stay on the device (0-dim tensors), and the loop reads them all at once, in one
transfer, at its log points and before every checkpoint (``Guard.read``).

Acting without a sync: the fused Adam, AdamW and SGD kernels take a ``found_inf`` tensor
(the mechanism ``torch.amp.GradScaler`` uses) and leave the weights, the moments and the step
count untouched when it is 1, so a bad step is masked on the device. ``--on-nan skip`` relies
on it; ``--on-nan stop`` masks too (the weights stay the last good ones) and raises at the
next read, which may lag the bad step by up to ``--log-every`` epochs, never past a
checkpoint. Optimizers without ``found_inf`` (``--optimizer-impl default``, a user's own)
under ``--on-nan skip`` read the flag every step instead: correct, one sync per step.

Agreement between ranks: every rank must step or skip together. Under DDP the gradients are
already all-reduced, so every rank sees a NaN from any rank and reaches the same verdict
alone: no extra collective; the flags travel with the logged loss's all-reduce at log points.
Sharded gradients (FSDP, tensor and pipeline parallel) differ between ranks: ``--on-nan stop``
all-reduces the flags at log points only; ``--on-nan skip`` must agree before every step, so
it all-reduces one number per step (on the device under NCCL: still no host sync).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from gpupar.errors import TrainingError
from gpupar.memory import local_shard
from gpupar.topology import Topology


class Guard:
    """Per-step NaN/Inf flags and losses on the device; read in one transfer when asked."""

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scaler, mode: str,
                 topo: Topology):
        # Each rank checks its own (non-empty) shard of the gradients.
        self.params = [p for p in params if local_shard(p).numel()]
        self.optimizer, self.scaler, self.mode, self.topo = optimizer, scaler, mode, topo
        # The scaler passes its own found_inf to a fused optimizer; ours would clash with it.
        self.masks_on_device = scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False)
        self.agree_each_step = mode == "skip" and topo.distributed and not topo.dims.grads_replicated
        self._ones: dict[torch.device, torch.Tensor] = {}
        self._reset_window()
        self._reset_loss()

    def _reset_window(self) -> None:
        self.losses: list[torch.Tensor] = []   # each step's local loss, 0-dim
        self.flags: list[torch.Tensor] = []    # each step's 0-dim flag: 1.0 when its loss or a gradient is NaN/Inf
        self.where: list[tuple[int, int]] = []  # (step, epoch), on the host

    def _reset_loss(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0  # over the finite steps since the last log point
        self.loss_count: torch.Tensor | float = 0.0
        self._reset_epoch(None)

    def _reset_epoch(self, epoch: int | None) -> None:
        self.epoch: int | None = epoch  # the newest epoch read, and its finite steps' loss sums
        self.epoch_sum: torch.Tensor | float = 0.0
        self.epoch_count: torch.Tensor | float = 0.0

    def flag(self, loss: torch.Tensor) -> torch.Tensor:
        """Flag this step's loss and gradients; returns a 0-dim float 1.0 (bad) or 0.0, on the device.

        One multi-tensor kernel per device (GradScaler's non-finite check, with a scale of 1,
        which leaves every value as it is) and nothing else: the loss sums are taken at the
        next read, so a step costs two launches, not twenty.
        """
        loss = loss.detach()
        groups: dict[torch.device, list[torch.Tensor]] = {loss.device: [loss]}
        if self.scaler is None:  # fp16: Inf gradients are the GradScaler's signal to lower its scale and skip
            for p in self.params:
                if p.grad is not None:
                    g = local_shard(p.grad)
                    groups.setdefault(g.device, []).append(g)
        flags = []
        for device, tensors in groups.items():
            found = torch.zeros((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self._one(device))
            flags.append(found.to(loss.device, non_blocking=True))
        bad = flags[0] if len(flags) == 1 else torch.stack(flags).amax()
        if self.agree_each_step:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # a device collective under NCCL
        return bad

    def record(self, loss: torch.Tensor, bad: torch.Tensor, step: int, epoch: int) -> None:
        """Keep the step's loss and flag (on the device) for the next read."""
        self.losses.append(loss.detach())
        self.flags.append(bad)
        self.where.append((step, epoch))

    def _one(self, device: torch.device) -> torch.Tensor:
        if device not in self._ones:
            self._ones[device] = torch.ones((), device=device)
        return self._ones[device]

    def read(self, with_loss: bool, scheduler, history,
             log: Callable[[str], None]) -> tuple[float, float] | None:
        """One all-reduce and one host read: act on the flags of every step since the last read.

        Returns, when ``with_loss``, the mean loss over ranks of the finite steps of the newest
        epoch (what the classic loop prints at a log point) and of those since the last log
        point, and starts a new log window. Raises TrainingError under --on-nan stop.
        """
        n, topo = len(self.flags), self.topo
        if n:  # the window's finite steps join the loss sums (kept on the device until a log point)
            local = torch.stack(self.losses).to(torch.float64)  # [n]
            bad = torch.stack(self.flags).to(torch.float64)  # [n]
            good = torch.where(bad > 0, 0.0, local)
            self.loss_sum = self.loss_sum + good.sum()
            self.loss_count = self.loss_count + (1.0 - bad).sum()
            newest = self.where[-1][1]
            if newest != self.epoch:
                self._reset_epoch(newest)
            mine = torch.tensor([e == newest for _, e in self.where], dtype=torch.float64).to(local.device)
            self.epoch_sum = self.epoch_sum + (good * mine).sum()
            self.epoch_count = self.epoch_count + ((1.0 - bad) * mine).sum()
        mean = []
        if with_loss:  # NaN when every step was skipped
            mean = [_mean(self.epoch_sum, self.epoch_count), _mean(self.loss_sum, self.loss_count)]
        # per step: any rank's step bad, any rank's loss non-finite (which says what went wrong)
        flags = [bad, (~torch.isfinite(local)).to(torch.float64)] if n else []
        reduced = [t.to(topo.comm_device(), torch.float64).reshape(-1) for t in mean + flags]
        if not reduced:
            return None
        shared = torch.cat(reduced)
        if topo.distributed:  # the loss mean and the flags in one all-reduce (DDP had this one already)
            dist.all_reduce(shared)
        values = torch.cat([shared] + ([local.to(shared.device)] if n else [])).tolist()  # the one host read
        loss = (values.pop(0) / topo.world_size, values.pop(0) / topo.world_size) if with_loss else None
        step_bad, loss_bad, losses = values[:n], values[n:2 * n], values[2 * n:]
        history.step_losses.extend(losses)
        where = self.where
        self._reset_window()
        if with_loss:
            self._reset_loss()
        skipped = 0
        for i, (step, epoch) in enumerate(where):
            if not step_bad[i]:
                continue
            if self.mode == "stop":
                what = f"loss became non-finite ({losses[i]})" if loss_bad[i] else "gradients became non-finite"
                raise TrainingError(f"{what} at step {step} (epoch {epoch}); training stopped and no weights or "
                                    "checkpoint were written from this step on")
            kind = "loss" if loss_bad[i] else "gradients"
            history.skipped_steps.append(step)
            skipped += 1
            if topo.is_main:
                log(f"Step {step}: non-finite {kind}; skipped on all ranks (--on-nan skip)")
        if skipped and scheduler is not None:
            _unstep(scheduler, skipped)
        return loss


def _mean(total, count) -> torch.Tensor:
    return total / count if isinstance(count, torch.Tensor) else torch.tensor(math.nan, dtype=torch.float64)


def _unstep(scheduler, steps: int) -> None:
    """Take back ``steps`` scheduler steps (skipped optimizer steps do not advance the LR).

    The loop learns of a skip only at the next read, so the steps in between ran one
    schedule step ahead per skipped step; from here on the schedule is exact again.
    """
    scheduler.last_epoch -= steps
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):  # a captured step reads this tensor (graphs.py)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs
