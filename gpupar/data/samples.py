"""Map-style training samples and the batch plan: global batches as index lists, each cut
into --grad-accum micro-batches and dp equal shards, so the single-device run and every
data-parallel rank see the same global batches in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import Dataset, default_collate

from gpupar.errors import UsageError, first_line


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of range(n) into (train indices, validation indices)."""
    if fraction <= 0:
        return torch.arange(n), torch.arange(0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise UsageError(f"--val-fraction {fraction} leaves no training samples out of {n}")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@dataclass
class Samples:
    """Training samples: tensors X, y, or a map-style Dataset restricted to ``index``.

    A Dataset's items may be anything ``collate_fn`` takes (tensors, tuples, dicts, nestings
    of them); ``workers`` > 0 loads batches in DataLoader worker processes that prefetch while
    the model steps (training/loop.py), as a user's DataLoader asked for.
    """

    source: tuple[torch.Tensor, torch.Tensor] | Dataset
    index: torch.Tensor | None  # [n] positions into the source; None: every row in order (no [N] index held)
    collate_fn: Callable = default_collate
    workers: int = 0
    pin_memory: bool = False

    @classmethod
    def of(cls, data, index: torch.Tensor | None, **loading) -> "Samples":
        if isinstance(data, (tuple, list)):
            X, y = data
            return cls((X, y) if index is None else (X[index], y[index]), None)
        return cls(data, index, **loading)

    def __len__(self) -> int:
        if self.index is not None:
            return len(self.index)
        return len(self.source[0]) if isinstance(self.source, tuple) else len(self.source)  # type: ignore[arg-type]

    def to(self, device: torch.device) -> "Samples":
        """Tensors move to the device once; a Dataset stays where it is (batches move per step)."""
        if isinstance(self.source, tuple):
            return Samples(tuple(t.to(device) for t in self.source), self.index)  # type: ignore[arg-type]
        return self

    def take(self, positions: torch.Tensor | slice):
        """The batch at ``positions`` (into this Samples). A slice of tensors is a view, not a copy."""
        if isinstance(self.source, tuple):
            X, y = self.source
            return X[positions], y[positions]
        if self.index is not None:
            return self.collate([int(i) for i in self.index[positions]])
        if isinstance(positions, slice):
            return self.collate(list(range(len(self))[positions]))
        return self.collate(positions.tolist())

    def collate(self, rows: list[int]):
        """The collated batch of Dataset rows ``rows`` (what a DataLoader worker runs)."""
        items = [self.source[i] for i in rows]
        for row, item in zip(rows, items):
            if item is None:
                raise UsageError(f"data: sample {row} is None; a Dataset must return a sample "
                                 "(a tensor, tuple, list or dict of tensors)")
        try:
            return self.collate_fn(items)
        except (TypeError, RuntimeError, KeyError) as exc:  # items of different structure or shape
            raise UsageError(f"data: samples {rows[0]}..{rows[-1]} do not collate into one batch "
                             f"({first_line(exc)}); every sample must have the same structure and shapes") from None

    def collate_index(self, positions: list[int]):
        """The collated batch at ``positions`` into this Samples (a DataLoader worker's job)."""
        return self.take(torch.as_tensor(positions, dtype=torch.long))

    def take_to(self, positions: torch.Tensor | slice, device: torch.device):
        if isinstance(self.source, tuple) and isinstance(positions, torch.Tensor):
            # Samples already on the GPU: send the [batch] index there without waiting, else
            # indexing copies it synchronously, a host stall every step.
            positions = positions.to(self.source[0].device, non_blocking=True)
        return to_device(self.take(positions), device)


def to_device(batch, device: torch.device):
    """A collated batch (a pytree of tensors) on ``device``. To CUDA, a host tensor is pinned
    first (a DataLoader worker's ``pin_memory`` already did) so that its copy does not wait:
    the step's kernels queue behind it. On the CPU nothing is copied or pinned."""
    if device.type != "cuda":
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return tree_map(move, batch)


def batch_rows(batch) -> int:
    """Samples in a collated batch: the leading size of its first tensor."""
    return next((int(t.shape[0]) for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()), 1)


def epoch_batches(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> "EpochBatches":
    """The global batches of one epoch as index tensors; identical on every rank.

    The last short batch is dropped when the data do not divide into whole batches,
    so that every optimizer step sees a full global batch on every rank.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)) if shuffle else None
    return EpochBatches(order, n // batch_size, batch_size)


@dataclass(frozen=True)
class EpochBatches:
    """An epoch's batches, cut when asked for: a token file of 10^8 windows is 10^7 batches,
    which as a list of index tensors would hold gigabytes before the first step. In order
    (``order`` None), a batch is a fresh ``arange``: no index of the whole epoch exists."""

    order: torch.Tensor | None  # [n] a seeded permutation, or None: rows in order
    count: int
    batch_size: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(f"batch {i} of {self.count}")
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        return torch.arange(lo, hi) if self.order is None else self.order[lo:hi]

    def __iter__(self):
        return (self[i] for i in range(self.count))


def shard_batch(batch: torch.Tensor, parts: int, part: int) -> torch.Tensor:
    """The ``part``-th of ``parts`` equal, contiguous, disjoint slices of a batch of indices."""
    size = len(batch) // parts
    return batch[part * size:(part + 1) * size]


def check_batch_divisible(batch_size: int, grad_accum: int, dp: int, samples: int, microbatches: int = 1,
                    full_batch: bool = False) -> None:
    """A global batch must split evenly into grad_accum micro-batches over dp ranks (and each
    rank's part into the pipeline's micro-batches); the error suggests a size that fits the
    ``samples`` there are."""
    unit = grad_accum * dp * microbatches
    if batch_size % unit == 0:
        return
    parts = [f"--grad-accum ({grad_accum})", f"data-parallel ranks ({dp})"]
    if microbatches > 1:
        parts.append(f"--microbatches ({microbatches})")
    what = f"the full batch of {batch_size} samples" if full_batch else f"--batch-size {batch_size}"
    fits = [size for size in (batch_size // unit * unit, -(-batch_size // unit) * unit) if 0 < size <= samples]
    hint = (f"try --batch-size {min(fits, key=lambda size: abs(size - batch_size))}" if fits else
            f"the {samples} training samples cannot fill even one batch of {unit}: use fewer ranks")
    raise UsageError(f"{what} must be divisible by {' x '.join(parts)} = {unit}; {hint}")


def next_batch(loader):
    """The next batch of a DataLoader whose workers may raise a UsageError: one line, not the
    worker's traceback that the loader wraps it in."""
    try:
        return next(loader)
    except UsageError as exc:
        raise UsageError(worker_line(exc)) from None


def worker_line(exc: BaseException) -> str:
    """The one line of a UsageError that a DataLoader worker raised (the loader re-raises it
    with the worker's whole traceback as its message)."""
    lines = str(exc).strip().splitlines()
    last, marker = (lines[-1] if lines else ""), "UsageError: "
    return last.split(marker, 1)[1] if marker in last else last


def epoch_samples(samples) -> int | None:
    """The training samples of one epoch; None for a stream without ``len`` (known after a pass)."""
    return samples.length if hasattr(samples, "length") else len(samples)


def eval_batches(samples, size: int, device: torch.device):
    """Every sample of ``samples`` once, in batches of ``size``, on ``device`` (validation)."""
    if hasattr(samples, "batches"):  # a stream: one pass
        for batch in samples.batches(size):
            yield to_device(batch, device)
        return
    for start in range(0, len(samples), size):
        yield samples.take_to(slice(start, start + size), device)
