"""Each rank's shard of every GLOBAL batch of a user's DataLoader.

The loader's ``batch_size`` is the global batch: the samples one process would take in a step
are the samples all ranks take together, rank r the r-th equal contiguous slice of each, so
the model's math does not change with the world size. (This belongs on the data layer of
issue 22 once it lands; it is kept small and local until then.)
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Sampler

from gpupar.errors import UsageError


class ShardedBatches(Sampler):
    """The loader's own batch sampler, each batch cut to this rank's slice."""

    def __init__(self, batches, parts: int, part: int):
        self.batches, self.parts, self.part = batches, parts, part

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            batch = list(batch)
            if len(batch) % self.parts:
                raise UsageError(f"batch {i} has {len(batch)} samples, which do not split over {self.parts} "
                                 "data-parallel ranks; pass drop_last=True or a batch_size they divide")
            size = len(batch) // self.parts
            yield batch[self.part * size:(self.part + 1) * size]

    def __len__(self) -> int:
        return len(self.batches)


def shard_loader(loader: DataLoader, parts: int, part: int) -> DataLoader:
    """A DataLoader over the same dataset, collate_fn, workers, pinning and drop_last that
    yields this rank's slice of each of the original loader's global batches."""
    if parts == 1:
        return loader
    if loader.batch_sampler is None:
        raise UsageError("setup_dataloader needs a loader with a batch_size (its global batch)")
    if not hasattr(loader.batch_sampler, "__iter__") or loader._dataset_kind != 0:
        raise UsageError("setup_dataloader takes a map-style Dataset's loader here; an IterableDataset "
                         "needs the data layer's sharding (gpupar.train)")
    return DataLoader(loader.dataset, batch_sampler=ShardedBatches(loader.batch_sampler, parts, part),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
                      timeout=loader.timeout)
