"""An IterableDataset as training samples: one pass is an epoch, each sample trained once.

The global order is the stream's own order, whatever the number of ranks: global batch k is
samples [k*B, (k+1)*B) of the pass, cut as a map-style batch is (samples.py): --grad-accum
micro-batches, each in dp equal contiguous shards, of which rank r takes the r-th. So the
single-device run and N ranks train on the same global batches, and a position (epoch,
batches done) means the same samples at any world size: a resume may change it.

A stream cannot seek, so every rank, and each DataLoader worker of a rank, iterates it and
keeps only its own samples; the others are passed over, never collated or copied (Hugging
Face's split_dataset_by_node does the same when shards do not divide). A rank's workers
split its micro-batches again through ``get_worker_info``: micro-batch q goes to worker
q mod W, which is the order a DataLoader returns its workers' results in, so the rank sees
its micro-batches in stream order. A micro-batch is handed out only when its global batch is
complete on the stream, so all ranks stop together at the same global batch when the stream
ends; the samples after the last whole global batch are not trained, and the loop says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from gpupar.data.samples import to_device, worker_line
from gpupar.errors import UsageError, first_line


@dataclass(frozen=True)
class StreamEnd:
    """Sent once per pass, after the last micro-batch: how many samples the pass held."""

    samples: int


@dataclass(frozen=True)
class Cut:
    """How this rank cuts the stream: the global batch, its micro-batches, this rank's shard."""

    batch_size: int
    grad_accum: int
    dp: int
    rank: int
    skip_batches: int = 0  # global batches of this pass consumed before a resume


@dataclass
class Stream:
    """An IterableDataset, read as described above; ``length`` is its ``len()`` when it has one."""

    source: IterableDataset
    length: int | None = None
    collate_fn: Callable = default_collate
    workers: int = 0
    pin_memory: bool = False

    def __len__(self) -> int:  # what validation sizes and the logs ask; a stream without len is 0 there
        return self.length or 0

    def to(self, device: torch.device) -> "Stream":
        return self  # batches move per step

    def micro_batches(self, epoch: int, cut: Cut, device: torch.device) -> Iterator:
        """This rank's micro-batches of one pass, in stream order, on ``device``; then a StreamEnd."""
        if hasattr(self.source, "set_epoch"):  # a seeded per-epoch shuffle (Hugging Face, torchdata)
            self.source.set_epoch(epoch)
        reader = RankReader(self.source, cut, self.collate_fn)
        if self.workers == 0:
            items: Iterator = iter(reader)
        else:
            items = iter(DataLoader(reader, batch_size=None, num_workers=self.workers,
                                    pin_memory=self.pin_memory and device.type == "cuda"))
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except UsageError as exc:  # raised in a worker: the loader wraps it with its traceback
                raise UsageError(worker_line(exc)) from None
            yield item if isinstance(item, StreamEnd) else to_device(item, device)

    def batches(self, size: int) -> Iterator:
        """Collated batches of ``size`` over one whole pass, in this process (validation)."""
        rows: list = []
        for j, item in enumerate(self.source):
            rows.append((j, item))
            if len(rows) == size:
                yield collate_rows(rows, self.collate_fn)
                rows = []
        if rows:
            yield collate_rows(rows, self.collate_fn)


class RankReader(IterableDataset):
    """One rank's (and one worker's) share of a pass, as collated micro-batches."""

    def __init__(self, source: IterableDataset, cut: Cut, collate_fn: Callable):
        self.source, self.cut, self.collate_fn = source, cut, collate_fn

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        c = self.cut
        micro = c.batch_size // c.grad_accum
        shard = micro // c.dp
        lo, hi = c.rank * shard, (c.rank + 1) * shard  # this rank's rows of every micro-batch
        pending: list[list] = []  # this worker's finished micro-batches of the current global batch
        rows: list = []
        seen = 0
        for j, item in enumerate(self.source):
            seen = j + 1
            batch, offset = divmod(j, c.batch_size)
            if batch < c.skip_batches:
                continue
            m, row = divmod(offset, micro)
            if ((batch - c.skip_batches) * c.grad_accum + m) % workers == worker and lo <= row < hi:
                rows.append((j, item))
                if row == hi - 1:
                    pending.append(rows)
                    rows = []
            if offset == c.batch_size - 1:  # the global batch is whole: every rank hands its part out
                for done in pending:
                    yield collate_rows(done, self.collate_fn)
                pending = []
        if worker == 0:
            yield StreamEnd(seen)


def collate_rows(rows: list, collate_fn: Callable):
    """Collate (stream position, sample) pairs; a bad sample is one line naming its position."""
    for j, item in rows:
        if item is None:
            raise UsageError(f"data: sample {j} of the stream is None; an IterableDataset must yield samples "
                             "(a tensor, tuple, list or dict of tensors)")
    try:
        return collate_fn([item for _, item in rows])
    except (TypeError, RuntimeError, KeyError) as exc:  # items of different structure or shape
        raise UsageError(f"data: stream samples {rows[0][0]}..{rows[-1][0]} do not collate into one batch "
                         f"({first_line(exc)}); every sample must have the same structure and shapes") from None

