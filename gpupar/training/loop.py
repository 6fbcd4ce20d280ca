"""The training loop, top to bottom: batch, forward, loss, backward, sync, step, log.

``fit`` trains an already-placed (and possibly parallelised) model; ``evaluate`` is its
validation pass. `gpupar train` reaches it through ``job.train_from_config``, the Python API
through ``gpupar.api.train``.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn

from gpupar.config import Config
from gpupar.data import (Cut, Samples, Stream, StreamEnd, batch_rows, check_batch_divisible, epoch_batches, epoch_samples,
                         eval_batches, next_batch, shard_batch, to_device)
from gpupar.errors import UsageError
from gpupar.memory import grad_bytes
from gpupar.parallel.clip import clip_grad_norm_across
from gpupar.parallelize import Parallelized, captures_whole_step
from gpupar.topology import Topology
from gpupar.training import graphs
from gpupar.training.finite import Guard
from gpupar.training.recipe import autocast_for, make_scheduler
from gpupar.training.state import History, Position
from gpupar.training.step import call_model, forward_backward, loss_of, split_batch

if TYPE_CHECKING:  # the checkpointer imports DCP; a run without checkpoints never needs it
    from gpupar.checkpoint import Checkpointer

@dataclass
class Hooks:
    """Where the loop reports: ``log`` takes rank 0's lines; ``on_step(step)`` runs after every
    optimizer step (``gpupar bench`` times steps with it); ``on_record`` receives each logged
    record (an experiment tracker's ``log``)."""

    log: Callable[[str], None] = print
    on_step: Callable[[int], None] | None = None
    on_record: Callable[[dict], None] | None = None


@dataclass(frozen=True)
class Steps:
    """How the data is walked: the global batch, the batches of one epoch, the steps in all."""

    batch_size: int
    per_epoch: int
    total: int

    @classmethod
    def of(cls, samples: int | None, cfg: Config, dp: int) -> "Steps":
        """``samples`` None: a stream without ``len``, whose epochs end when a pass does
        (per_epoch 0: not known before; total --max-steps, or until the last pass ends)."""
        t = cfg.train
        batch_size = t.batch_size or samples
        if samples is not None and batch_size > samples:
            raise UsageError(f"--batch-size {batch_size} exceeds the {samples} training samples")
        check_batch_divisible(batch_size, t.grad_accum, dp, samples or batch_size)
        if samples is None:
            return cls(batch_size, 0, t.max_steps or sys.maxsize)
        per_epoch = samples // batch_size
        return cls(batch_size, per_epoch, int(min(t.max_steps or math.inf, t.epochs * per_epoch)))


def fit(parallel: Parallelized | nn.Module, train_set: Samples, cfg: Config, topo: Topology, loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer, val_set: Samples | None = None, checkpoints: Checkpointer | None = None,
        hooks: Hooks = Hooks()) -> History:
    """Train the model that ``parallelize`` returned (or a plain module on ``topo.device``)
    and return its history.

    Every rank walks the same global batches; each takes its own slice of every micro-batch.
    With ``checkpoints`` (gpupar.checkpoint.Checkpointer), training first restores the chosen
    checkpoint and continues at its step and batch, and a checkpoint is saved after every
    ``--checkpoint-every`` steps.
    """
    t, parallel = cfg.train, _as_parallelized(parallel)
    model, steps = parallel.model, Steps.of(epoch_samples(train_set), cfg, topo.dp)
    if t.cuda_graphs:
        graphs.need_cuda(topo.device.type)
    # One process, one device and the ordinary step: --cuda-graphs captures the whole step.
    whole_step = captures_whole_step(cfg, topo.dims) and not parallel.pipeline and len(parallel.devices) == 1
    scheduler = make_scheduler(optimizer, cfg, steps.total)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = _loss_scaler(parallel, topo) if t.precision == "fp16" and topo.device.type == "cuda" else None
    amp = autocast_for(topo.device, t.precision, cache=not whole_step)
    train_set = train_set.to(topo.device)  # tensors move once, not every step
    # Resuming puts back weights, optimizer, scheduler and RNG, and says where to continue.
    start = checkpoints.restore(model, optimizer, scheduler, steps.per_epoch, steps.total) if checkpoints \
        else Position()
    # NaN/Inf flags and losses stay on the device until a log point or a checkpoint (finite.py).
    guard = Guard(list(model.parameters()), optimizer, scaler, cfg.checkpoint.on_nan, topo)
    history = History(start_step=start.step)
    train_step = _train_step(parallel, loss_fn, optimizer, scaler, amp, guard, cfg, history)
    if whole_step:
        graphs.check(cfg, optimizer)
        train_step = graphs.WholeStep(train_step)
    logger = _Logger(cfg, topo, hooks, history, steps, start)
    checkpoint_every = checkpoints.every if checkpoints is not None else None

    model.train()
    optimizer.zero_grad(set_to_none=True)
    step = start.step
    for epoch, i, epoch_end, micro_batches in _batches(train_set, cfg, topo, steps, start, hooks.log):
        if t.cuda_graphs and not whole_step:  # compile's graphs may reuse the last step's buffers
            torch.compiler.cudagraph_mark_step_begin()
        step_loss, bad = train_step(micro_batches, step == start.step)
        guard.record(step_loss, bad, step + 1, epoch + 1)
        if scheduler is not None:
            scheduler.step()  # a skipped step is taken back when the flags are read
        step += 1
        logger.stepped(step)
        done = step >= steps.total
        if done or epoch_end:  # a log point: the one host read since the last one
            record = logger.record(step, epoch, *guard.read(True, scheduler, history, hooks.log), optimizer)
            if val_set is not None and len(val_set):
                record["val_loss"] = evaluate(model, val_set, loss_fn, topo, t.precision, steps.batch_size)
            logger.emit(record)
        if checkpoint_every and step % checkpoint_every == 0:
            guard.read(False, scheduler, history, hooks.log)  # never a checkpoint after an unread NaN
        if checkpoints is not None:  # after the step and its log line: the state a resume needs
            checkpoints.on_step_end(Position(step, epoch, i + 1), model, optimizer, scheduler, steps.total)
        if done:
            break
    return logger.close(step)


def _loss_scaler(parallel: Parallelized, topo: Topology) -> torch.amp.GradScaler:
    """fp16's loss scaler; a pipeline's checks every stage's gradients for Inf together."""
    if parallel.pipeline:
        from gpupar.parallel.pipeline_scaler import PipelineGradScaler

        return PipelineGradScaler(topo.device, parallel.model.pp_group, topo.comm_device())
    return torch.amp.GradScaler(topo.device.type)


def _as_parallelized(model: Parallelized | nn.Module) -> Parallelized:
    """A plain module (the Python API on one device, tests) runs the ordinary step."""
    if isinstance(model, Parallelized):
        return model
    devices = tuple(sorted({p.device for p in model.parameters()}, key=str))
    return Parallelized(model, functools.partial(forward_backward, model), False, devices)


def _train_step(parallel: Parallelized, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler, amp,
                guard: Guard, cfg: Config, history: History):
    """One step: forward and backward, the NaN/Inf flag, the optimizer step; returns
    ``step(micro_batches, first) -> (loss, flag)``, both still on the device."""
    model, clip = parallel.model, cfg.optim.clip_grad_norm

    def train_step(micro_batches, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        step_loss = parallel.step(micro_batches, loss_fn, amp, scaler)  # a 0-dim tensor, still on the device
        # NaN/Inf in the loss or in the gradients, on any rank: every rank must step, skip or
        # stop together. The flag stays on the device: a fused optimizer masks the step with it.
        bad = guard.flag(step_loss)
        if first:  # gradients exist only between backward and the step: count them now
            history.grad_bytes = grad_bytes(model)
        if guard.masks_on_device:
            optimizer.found_inf = bad  # 1.0: the fused kernel leaves weights and moments as they are
            _optimizer_step(model, optimizer, scaler, clip)
            del optimizer.found_inf
        elif cfg.checkpoint.on_nan == "skip" and scaler is None and bool(bad):  # no found_inf: one sync
            optimizer.zero_grad(set_to_none=True)
        else:
            _optimizer_step(model, optimizer, scaler, clip)
        return step_loss, bad

    return train_step


def _batches(train_set: Samples | Stream, cfg: Config, topo: Topology, steps: Steps, start: Position, log):
    """(epoch, batch index, whether it ends a logged epoch, this rank's micro-batches), from
    ``start`` on: every rank walks the same global batches, cut into --grad-accum slices,
    each cut into dp equal shards of which this rank takes its own."""
    t = cfg.train
    if isinstance(train_set, Stream):
        yield from _stream_batches(train_set, cfg, topo, steps.batch_size, start, log)
        return
    # Full batch, in order, on one rank: the same single micro-batch every step (a view, no copy).
    if t.batch_size is None and not cfg.data.shuffle and topo.dp == 1 and t.grad_accum == 1:
        same = [train_set.take_to(slice(None), topo.device)]
        for epoch, i, epoch_end, _ in _plan(train_set, cfg, topo, steps, start):
            yield epoch, i, epoch_end, same
        return
    plan = _plan(train_set, cfg, topo, steps, start)
    if train_set.workers == 0:
        for epoch, i, epoch_end, shards in plan:
            yield epoch, i, epoch_end, [train_set.take_to(rows, topo.device) for rows in shards]
        return
    # DataLoader workers collate this rank's micro-batches ahead of the step, in plan order.
    from torch.utils.data import DataLoader

    rows_in_order = (rows.tolist() for _, _, _, shards in _plan(train_set, cfg, topo, steps, start) for rows in shards)
    loader = iter(DataLoader(range(len(train_set)), batch_sampler=rows_in_order, num_workers=train_set.workers,
                             collate_fn=train_set.collate_index, pin_memory=train_set.pin_memory and topo.device.type == "cuda"))
    for epoch, i, epoch_end, shards in plan:
        yield epoch, i, epoch_end, [to_device(next_batch(loader), topo.device) for _ in shards]


def _stream_batches(stream: Stream, cfg: Config, topo: Topology, batch_size: int, start: Position, log):
    """The same, from a stream: an epoch is one pass, and it ends when the pass does, so each
    step is handed on only once the next one is read (or the pass ended): then it is known
    whether it ends the epoch. Every rank reads the same pass and stops at the same batch."""
    t = cfg.train
    for epoch in range(start.epoch, t.epochs):
        skip = start.batch if epoch == start.epoch else 0
        logged = (epoch + 1) % t.log_every == 0 or epoch + 1 == t.epochs
        held, micro, i, end = None, [], skip, StreamEnd(0)
        for item in stream.micro_batches(epoch, Cut(batch_size, t.grad_accum, topo.dp, topo.dp_rank, skip),
                                         topo.device):
            if isinstance(item, StreamEnd):
                end = item
                continue
            micro.append(item)
            if len(micro) == t.grad_accum:
                if held is not None:
                    yield epoch, i, False, held
                    i += 1
                held, micro = micro, []
        if held is not None:
            yield epoch, i, logged, held
        elif skip == 0:  # not one whole global batch in the pass
            what = "no samples" if end.samples == 0 else f"{end.samples} samples, fewer than one global batch of {batch_size}"
            raise UsageError(f"data: the stream yielded {what} in epoch {epoch + 1}; expected at least {batch_size}")
        left = end.samples % batch_size
        if left and epoch == start.epoch and topo.is_main:
            log(f"data: the stream's last {left} of {end.samples} samples do not fill a global batch of "
                f"{batch_size} and are not trained (each epoch)")


def _plan(train_set: Samples, cfg: Config, topo: Topology, steps: Steps, start: Position):
    """(epoch, batch index, ends a logged epoch, this rank's micro-batch positions) from ``start``."""
    t = cfg.train
    for epoch in range(start.epoch, t.epochs):
        batches = epoch_batches(len(train_set), steps.batch_size, cfg.data.shuffle, t.seed, epoch)
        logged = (epoch + 1) % t.log_every == 0 or epoch + 1 == t.epochs
        for i, batch in enumerate(batches):
            if epoch == start.epoch and i < start.batch:
                continue  # consumed before the checkpoint this run resumed from
            shards = [shard_batch(m, topo.dp, topo.dp_rank) for m in batch.chunk(t.grad_accum)]
            yield epoch, i, logged and i == len(batches) - 1, shards


class _Logger:
    """The log points' records and lines, the progress bar, and the run's speed."""

    def __init__(self, cfg: Config, topo: Topology, hooks: Hooks, history: History, steps: Steps, start: Position):
        self.cfg, self.topo, self.hooks, self.history, self.steps, self.start = cfg, topo, hooks, history, steps, start
        self.bar = _progress(steps.total - start.step, topo, cfg.train.progress)
        self.began = self.last_log = time.perf_counter()
        self.samples_since_log = 0

    def stepped(self, step: int) -> None:
        self.samples_since_log += self.steps.batch_size
        if self.hooks.on_step is not None:
            self.hooks.on_step(step)
        if self.bar is not None:
            self.bar.update(1)

    def record(self, step: int, epoch: int, loss: float, loss_since_log: float,
               optimizer: torch.optim.Optimizer) -> dict:
        """``loss``: the logged epoch's own (its steps' mean, the classic loop's printed loss);
        ``loss_since_log``: the mean over every step since the previous log point."""
        now = time.perf_counter()
        record = {"step": step, "epoch": epoch + 1, "loss": loss, "loss_since_log": loss_since_log,
                  "lr": float(optimizer.param_groups[0]["lr"]),
                  "samples_per_s": self.samples_since_log / max(now - self.last_log, 1e-9)}
        self.last_log, self.samples_since_log = now, 0
        return record

    def emit(self, record: dict) -> None:
        self.history.records.append(record)
        if self.hooks.on_record is not None:
            self.hooks.on_record(record)
        if self.topo.is_main:
            line = f"Epoch [{record['epoch']}/{self.cfg.train.epochs}], Loss: {record['loss']:.4f}"
            if "val_loss" in record:
                line += f", Val Loss: {record['val_loss']:.4f}"
            (self.bar.write if self.bar is not None else self.hooks.log)(line)

    def close(self, step: int) -> History:
        if self.bar is not None:
            self.bar.close()
        self.history.wall_time = time.perf_counter() - self.began
        self.history.samples_per_s = (step - self.start.step) * self.steps.batch_size / max(self.history.wall_time, 1e-9)
        return self.history


def _mixes_dtensors(params: list[nn.Parameter]) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    return tensor is not None and len({isinstance(p, tensor.DTensor) for p in params}) == 2


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, clip: float | None) -> None:
    if clip is not None:
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if hasattr(model, "clip_grad_norm_"):  # a pipeline: the norm spans every stage
            model.clip_grad_norm_(clip)
        elif _mixes_dtensors(params := list(model.parameters())):  # TP's shards beside the layers it keeps
            clip_grad_norm_across(params, clip, None, params[0].device)  # whole: torch's cannot mix them
        else:
            torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees gradient memory until the next backward


@torch.no_grad()
def evaluate(model: nn.Module, samples: Samples, loss_fn: nn.Module, topo: Topology,
             precision: str = "fp32", batch_size: int | None = None) -> float:
    """Mean loss over ``samples`` (every rank evaluates all of them; they agree)."""
    if hasattr(model, "evaluate_loss"):  # a pipeline: forward through its stages, loss from the last
        return model.evaluate_loss(samples, loss_fn, precision, batch_size)
    model.eval()
    total, n = 0.0, 0
    size = batch_size or len(samples) or 1024
    for batch in eval_batches(samples, size, topo.device):
        args, kwargs, target = split_batch(batch)
        with autocast_for(topo.device, precision):
            loss = loss_of(loss_fn, call_model(model, args, kwargs), batch, target)
        rows = batch_rows(batch)
        total += loss.item() * rows
        n += rows
    model.train()
    return total / max(n, 1)


def mean_over_ranks(values: list[float], topo: Topology) -> list[float]:
    if not topo.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=topo.comm_device())
    dist.all_reduce(t)
    return (t / topo.world_size).tolist()


def _progress(total: int, topo: Topology, enabled: bool):
    """A tqdm bar on rank 0 when stderr is a terminal; None (plain log lines) otherwise."""
    if not (enabled and topo.is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)


