"""The training loop, top to bottom: batch, forward, loss, backward, sync, step, log.

``fit`` trains an already-placed (and possibly parallelised) model. ``train`` is the
Python API for any ``nn.Module``; ``cli_train`` is what ``gpupar train`` runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from gpupar.config import Config
from gpupar.data import Samples, check_divisible, epoch_batches, shard_batch, split_validation
from gpupar.errors import UsageError
from gpupar.finite import Guard
from gpupar.memory import grad_bytes
from gpupar.models import ModelSpec
from gpupar.step import StepFn, forward_backward
from gpupar.topology import Topology

if TYPE_CHECKING:  # the checkpointer imports DCP; a run without checkpoints never needs it
    from gpupar.checkpoint import Checkpointer

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss, "cross-entropy": nn.CrossEntropyLoss,
}


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


def make_loss(cfg: Config, spec: ModelSpec | None = None) -> nn.Module:
    """The model's own loss (its spec says), else --loss, else the task's default."""
    if spec is not None and spec.loss is not None:
        return spec.loss()
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
    fused = {"fused": True} if o.optimizer_impl == "fused" and _fusable(params) else {}
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


def _fusable(params: list[torch.Tensor]) -> bool:
    """Fused kernels take floating-point tensors on CPU and CUDA, and DTensor parameters only
    when all of them are (a tensor-parallel stage beside whole embeddings mixes the two, and
    the fused op refuses the mix): such a model keeps torch's default implementation."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # loaded only if used
    dtensors = sum(isinstance(p, dtensor) for p in params) if dtensor else 0
    return bool(params) and dtensors in (0, len(params)) and \
        all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


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


def fit(model: nn.Module, train_set: Samples, cfg: Config, topo: Topology, loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer, val_set: Samples | None = None,
        log: Callable[[str], None] = print, checkpoints: Checkpointer | None = None,
        on_step: Callable[[int], None] | None = None, on_record: Callable[[dict], None] | None = None,
        step_fn: StepFn | None = None) -> History:
    """Train ``model`` (already on ``topo.device``) and return its history.

    ``step_fn`` runs one step's forward and backward (``parallelize`` returns it: a pipeline
    schedule's, or the ordinary one, which is the default).

    Every rank walks the same global batches; each takes its own slice of every micro-batch.
    With ``checkpoints`` (gpupar.checkpoint.Checkpointer), training first restores the chosen
    checkpoint and continues at its step and batch, and a checkpoint is saved after every
    ``--checkpoint-every`` steps. ``on_step(step)`` runs after every optimizer step
    (``gpupar bench`` times steps with it); ``on_record`` receives each logged record (an
    experiment tracker's ``log``).
    """
    t = cfg.train
    batch_size = t.batch_size or len(train_set)
    if batch_size > len(train_set):
        raise UsageError(f"--batch-size {batch_size} exceeds the {len(train_set)} training samples")
    check_divisible(batch_size, t.grad_accum, topo.dp, len(train_set))
    # graphs.py: one process on one device with the ordinary step (not a pipeline schedule, not
    # layer-split over several devices) captures the whole step.
    whole_step = t.cuda_graphs and not topo.distributed and \
        getattr(step_fn, "func", forward_backward) is forward_backward and len({p.device for p in model.parameters()}) == 1
    step_fn = compiled_step(model, step_fn, cfg, topo, whole_step)
    steps_per_epoch = len(train_set) // batch_size
    total_steps = int(min(t.max_steps or math.inf, t.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(topo.device.type) if t.precision == "fp16" and topo.device.type == "cuda" else None
    amp = autocast_for(topo.device, t.precision, cache=not whole_step)
    train_set = train_set.to(topo.device)  # tensors move once, not every step
    # Full batch, in order, on one rank: the same single micro-batch every step (a view, no copy).
    same_batch = [train_set.take_to(slice(None), topo.device)] if (t.batch_size is None and not cfg.data.shuffle
                                                   and topo.dp == 1 and t.grad_accum == 1) else None
    # Resuming puts back weights, optimizer, scheduler and RNG, and says where to continue.
    start = checkpoints.restore(model, optimizer, scheduler, steps_per_epoch, total_steps) if checkpoints \
        else Position()
    bar = _progress(total_steps - start.step, topo, t.progress)
    history, step = History(start_step=start.step), start.step
    began = last_log = time.perf_counter()
    samples_since_log = 0

    model.train()
    optimizer.zero_grad(set_to_none=True)
    # NaN/Inf flags and losses stay on the device until a log point or a checkpoint (finite.py).
    guard = Guard(list(model.parameters()), optimizer, scaler, cfg.checkpoint.on_nan, topo)

    def train_step(micro_batches, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward, the NaN/Inf flag, the optimizer step: (loss, flag), on the device."""
        step_loss = step_fn(micro_batches, loss_fn, amp, scaler)  # a 0-dim tensor, still on the device
        # NaN/Inf in the loss or in the gradients, on any rank: every rank must step, skip or
        # stop together. The flag stays on the device: a fused optimizer masks the step with it.
        bad = guard.flag(step_loss)
        if first:  # gradients exist only between backward and the step: count them now
            history.grad_bytes = grad_bytes(model)
        if guard.masks_on_device:
            optimizer.found_inf = bad  # 1.0: the fused kernel leaves weights and moments as they are
            _optimizer_step(model, optimizer, scaler, cfg.optim.clip_grad_norm)
            del optimizer.found_inf
        elif cfg.checkpoint.on_nan == "skip" and scaler is None and bool(bad):  # no found_inf: one sync
            optimizer.zero_grad(set_to_none=True)
        else:
            _optimizer_step(model, optimizer, scaler, cfg.optim.clip_grad_norm)
        return step_loss, bad

    if whole_step:
        from gpupar import graphs

        graphs.check(cfg, optimizer)
        train_step = graphs.WholeStep(train_step)
    checkpoint_every = checkpoints.every if checkpoints is not None else None
    for epoch in range(start.epoch, t.epochs):
        if step >= total_steps:
            break
        batches = [None] if same_batch else epoch_batches(len(train_set), batch_size, cfg.data.shuffle,
                                                          t.seed, epoch)
        for i, batch in enumerate(batches):
            if epoch == start.epoch and i < start.batch:
                continue  # consumed before the checkpoint this run resumed from
            # This rank's micro-batches: grad_accum slices of the global batch, each cut into
            # dp equal shards, of which this rank takes its own.
            micro_batches = same_batch or [train_set.take_to(shard_batch(m, topo.dp, topo.dp_rank), topo.device)
                                           for m in batch.chunk(t.grad_accum)]
            if t.cuda_graphs and not whole_step:  # compile's graphs may reuse the last step's buffers
                torch.compiler.cudagraph_mark_step_begin()
            step_loss, bad = train_step(micro_batches, step == start.step)
            guard.record(step_loss, bad, step + 1, epoch + 1)
            if scheduler is not None:
                scheduler.step()  # a skipped step is taken back when the flags are read
            step += 1
            samples_since_log += batch_size
            if on_step is not None:
                on_step(step)
            if bar is not None:
                bar.update(1)

            done = step >= total_steps
            epoch_end = i == len(batches) - 1 and ((epoch + 1) % t.log_every == 0 or epoch + 1 == t.epochs)
            if done or epoch_end:  # a log point: the one host read since the last one
                now = time.perf_counter()
                loss = guard.read(True, scheduler, history, log)
                record = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": float(optimizer.param_groups[0]["lr"]),
                          "samples_per_s": samples_since_log / max(now - last_log, 1e-9)}
                if val_set is not None and len(val_set):
                    record["val_loss"] = evaluate(model, val_set, loss_fn, topo, t.precision, batch_size)
                history.records.append(record)
                if on_record is not None:
                    on_record(record)
                if topo.is_main:
                    line = f"Epoch [{epoch + 1}/{t.epochs}], Loss: {record['loss']:.4f}"
                    if "val_loss" in record:
                        line += f", Val Loss: {record['val_loss']:.4f}"
                    (bar.write if bar is not None else log)(line)
                last_log, samples_since_log = now, 0
            if checkpoint_every and step % checkpoint_every == 0:
                guard.read(False, scheduler, history, log)  # never a checkpoint after an unread NaN
            if checkpoints is not None:  # after the step and its log line: the state a resume needs
                checkpoints.on_step_end(Position(step, epoch, i + 1), model, optimizer, scheduler, total_steps)
            if done:
                break

    if bar is not None:
        bar.close()
    history.wall_time = time.perf_counter() - began
    history.samples_per_s = (step - start.step) * batch_size / max(history.wall_time, 1e-9)
    return history


def compiled_step(model: nn.Module, step_fn: StepFn | None, cfg: Config, topo: Topology,
                  whole_step: bool = False) -> StepFn:
    """The step function, with the model compiled in place under --compile / --cuda-graphs.

    ``nn.Module.compile`` keeps the module (and its state-dict names) and compiles its
    forward; backward follows through AOTAutograd. ``--cuda-graphs`` on one process captures
    the whole step (``whole_step``, graphs.py); across ranks it is compile's ``reduce-overhead``
    mode, which records the forward and backward kernels as CUDA graphs. Either way the
    shapes must stay the same: full batches, or batches that divide the data.
    """
    t = cfg.train
    if t.cuda_graphs:
        from gpupar.graphs import need_cuda

        need_cuda(topo.device.type)
    if (t.compile or t.cuda_graphs) and step_fn is not None and getattr(step_fn, "func", None) is not forward_backward:
        raise UsageError("--compile / --cuda-graphs with --pp: pipeline stages are not compiled yet")
    if t.compile or (t.cuda_graphs and not whole_step):
        model.compile(mode="reduce-overhead" if t.cuda_graphs and not whole_step else None)
    return step_fn or functools.partial(forward_backward, model)


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, clip: float | None) -> None:
    if clip is not None:
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
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
    model.eval()
    total, n = 0.0, 0
    size = batch_size or len(samples)
    for start in range(0, len(samples), size):
        x, y = samples.take_to(slice(start, start + size), topo.device)
        with autocast_for(topo.device, precision):
            loss = loss_fn(model(x), y)
        total += loss.item() * len(x)
        n += len(x)
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


def as_samples(data, cfg: Config) -> tuple[Samples, Samples | None]:
    """Tensors ``(X, y)`` or a Dataset of ``(x, y)``, split into train and validation samples."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        X, y = data
        if len(X) != len(y):
            raise UsageError(f"data: X has {len(X)} rows but y has {len(y)}")
        n = len(X)
    elif isinstance(data, Dataset):
        n = len(data)  # type: ignore[arg-type]
    else:
        raise UsageError("data must be a pair of tensors (X, y) or a torch Dataset of (x, y) pairs")
    train_idx, val_idx = split_validation(n, cfg.data.val_fraction, cfg.train.seed)
    train_set = Samples.of(data, train_idx)
    return train_set, (Samples.of(data, val_idx) if len(val_idx) else None)


def train(model: nn.Module, data, loss: nn.Module | Callable | None = None,
          optimizer: torch.optim.Optimizer | None = None, config: Config | None = None,
          val_data=None) -> TrainResult:
    """Train any ``nn.Module`` on one device without writing a loop.

    ``data`` (and ``val_data``) are ``(X, y)`` tensors or a Dataset of ``(x, y)`` pairs.
    ``config`` defaults to the classic example's settings (Adam, lr 0.01, 100 full-batch epochs).
    """
    from gpupar.devices import pick_device

    cfg = (config or Config()).validate()
    device = pick_device(cfg.train.device)
    model = model.to(device)
    train_set, val_set = as_samples(data, cfg)
    if val_data is not None:
        val_set = as_samples(val_data, Config())[0]
    optimizer = optimizer or make_optimizer(model, cfg)
    history = fit(model, train_set, cfg, Topology.single(device), loss or make_loss(cfg), optimizer, val_set)
    return TrainResult(model, history)
