"""Data, in the shapes users bring it, and the per-rank batch plan.

    files.py    the classic synthetic example; CSV / NPZ / PT files that fit in memory
    samples.py  map-style samples (tensors or a Dataset) and the global batch plan, cut per rank
    stream.py   an IterableDataset: one pass an epoch, each rank and worker reading its share
    tokens.py   a token file (uint16 / uint32 ids) as windows of --seq-len, memory-mapped
    sources.py  what gpupar.train and --data accept, checked once (as_samples, load_data)

Every source has one global sample order that does not depend on the world size: global
batches are planned (or read) the same on one device and on N ranks, then cut into
--grad-accum micro-batches and dp equal shards.
"""

from gpupar.data.files import DATA_FORMS, load_file, prepare_targets, synthetic_regression
from gpupar.data.samples import (Samples, batch_rows, check_batch_divisible, epoch_batches, epoch_samples,
                                 eval_batches, next_batch, shard_batch, split_validation, to_device)
from gpupar.data.sources import FULL_BATCH_LIMIT, as_samples, as_stream, first_samples, load_data
from gpupar.data.stream import Cut, Stream, StreamEnd

__all__ = ["DATA_FORMS", "FULL_BATCH_LIMIT", "Cut", "Samples", "Stream", "StreamEnd", "as_samples", "as_stream",
           "batch_rows", "check_batch_divisible", "epoch_batches", "epoch_samples", "eval_batches", "first_samples",
           "load_data", "load_file",
           "next_batch", "prepare_targets", "shard_batch", "split_validation", "synthetic_regression", "to_device"]
