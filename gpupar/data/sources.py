"""The user's data as training samples: tensors, a map-style Dataset, an IterableDataset, a
DataLoader over either, or a Hugging Face ``datasets`` table; and ``--data module:factory``.

Checked here once, before any step: a bad structure, an empty source, a stream with no batch
size are one line (UsageError), never a traceback or a silent climb in memory.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from gpupar.config import Config
from gpupar.data.files import load_file
from gpupar.data.samples import Samples, split_validation
from gpupar.data.stream import Stream, collate_rows
from gpupar.data.tokens import TokenWindows, is_token_file
from gpupar.errors import UsageError, first_line
from gpupar.models.builtin import import_callable

# A Dataset collated whole at every step would climb in memory without a word: past this many
# samples, a Dataset source needs a batch size.
FULL_BATCH_LIMIT = 4096


def as_samples(data, cfg: Config) -> tuple[Samples | Stream, Samples | Stream | None]:
    """The user's data, split into train and validation samples.

    Accepted: tensors ``(X, y)`` (a 1-D float ``y`` is one output column, as the classic
    example writes it); a map-style Dataset whose items ``default_collate`` takes; a
    DataLoader over one, whose dataset, ``collate_fn``, ``num_workers`` and ``pin_memory`` are
    kept and whose ``batch_size`` is the GLOBAL batch (the model's math does not change with
    the number of ranks); its shuffling becomes gpupar's seeded shuffle, the same on every rank.
    An IterableDataset (or a DataLoader over one) is a Stream (stream.py): one pass an epoch.
    """
    loading: dict = {}
    if isinstance(data, DataLoader):
        data, loading = _from_loader(data, cfg)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        X, y = data
        if X.dim() == 0 or y.dim() == 0:
            raise UsageError("data: X and y need one row per sample; got a single number")
        if len(X) != len(y):
            raise UsageError(f"data: X has {len(X)} rows but y has {len(y)}")
        if y.dim() == 1 and y.is_floating_point():  # regression: one output column, [N] -> [N, 1]
            y = y[:, None]
        data, n = (X, y), len(X)
    elif isinstance(data, IterableDataset):
        return as_stream(data, cfg, loading), None
    elif isinstance(data, Dataset) or _is_table(data):
        data = _torch_format(data)
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise UsageError(f"data: {type(data).__name__} has no __len__; a map-style Dataset needs one") from None
        if n == 0:
            raise UsageError("data: the Dataset is empty; expected at least one sample")
        if cfg.train.batch_size is None and n > FULL_BATCH_LIMIT:
            raise UsageError(f"data: a Dataset of {n} samples needs a batch size (config.train.batch_size or "
                             f"--batch-size): the default full batch would collate all {n} samples every step")
    else:
        raise UsageError(f"data: got {type(data).__name__}; accepted: tensors (X, y), a map-style torch "
                         "Dataset, an IterableDataset, a DataLoader over either, or a Hugging Face datasets.Dataset")
    # No validation split: every row in order, with no [N] index (a token file may hold 10^8 windows).
    train_idx, val_idx = split_validation(n, cfg.data.val_fraction, cfg.train.seed) \
        if cfg.data.val_fraction > 0 else (None, torch.arange(0))
    train_set = Samples.of(data, train_idx, **loading)
    return train_set, (Samples.of(data, val_idx, **loading) if len(val_idx) else None)


def _from_loader(loader: DataLoader, cfg: Config) -> tuple[Dataset, dict]:
    """A user's DataLoader: its dataset and loading options; its batch size is the global batch."""
    from torch.utils.data import RandomSampler, SequentialSampler

    stream = isinstance(loader.dataset, IterableDataset)
    sampler = loader.sampler if loader.batch_size is not None else None
    if not stream and not isinstance(sampler, (RandomSampler, SequentialSampler)):
        raise UsageError(f"data: a DataLoader with {type(loader.sampler).__name__ if sampler is None else type(sampler).__name__}"
                         " and batch_size " f"{loader.batch_size}: gpupar plans the batches itself, so pass "
                         "batch_size=N and shuffle=True/False (no sampler or batch_sampler)")
    if stream and loader.batch_size is None:
        raise UsageError("data: a DataLoader over an IterableDataset with batch_size=None: give it batch_size=N "
                         "(the global batch); gpupar batches the stream itself")
    if cfg.train.batch_size is None:
        cfg.train.batch_size = loader.batch_size
    elif cfg.train.batch_size != loader.batch_size:
        raise UsageError(f"data: the DataLoader's batch_size {loader.batch_size} differs from "
                         f"config.train.batch_size {cfg.train.batch_size}; set one of them")
    cfg.data.shuffle = cfg.data.shuffle or isinstance(sampler, RandomSampler)
    return loader.dataset, {"collate_fn": loader.collate_fn, "workers": loader.num_workers,
                            "pin_memory": loader.pin_memory}


def as_stream(data: IterableDataset, cfg: Config, loading: dict) -> Stream:
    """An IterableDataset, with or without ``len``: what a stream needs known before its first pass."""
    t = cfg.train
    if t.batch_size is None:
        raise UsageError(f"data: an IterableDataset ({type(data).__name__}) needs a batch size "
                         "(config.train.batch_size, --batch-size or the DataLoader's batch_size): a full batch "
                         "of a stream would hold all of it in memory")
    if cfg.data.shuffle:
        raise UsageError("--shuffle with an IterableDataset: a stream is read in its own order; shuffle it in "
                         "the dataset (gpupar calls its set_epoch(epoch) before each pass when it has one)")
    if cfg.data.val_fraction:
        raise UsageError(f"--val-fraction {cfg.data.val_fraction} with an IterableDataset: a stream cannot be "
                         "split; pass the validation data apart (val_data)")
    if cfg.parallel.pp > 1:
        raise UsageError("--pp with an IterableDataset is not supported yet; pass a map-style Dataset")
    try:
        length = len(data)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        length = None
    if length is None and t.max_steps is None and cfg.optim.lr_schedule != "constant":
        raise UsageError(f"--lr-schedule {cfg.optim.lr_schedule} on an IterableDataset without __len__ needs "
                         "--max-steps: the steps of an epoch are known only after a pass")
    if length is not None and length < t.batch_size:
        what = "is empty (len 0)" if length == 0 else f"has {length} samples, fewer than one batch of {t.batch_size}"
        raise UsageError(f"data: the IterableDataset {what}; expected at least {t.batch_size}")
    return Stream(data, length, **loading)


def _is_table(data) -> bool:
    """A Hugging Face ``datasets.Dataset`` (Arrow, memory-mapped): indexable and sized, not a torch Dataset."""
    return type(data).__module__.startswith("datasets.") and hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _torch_format(data):
    """A ``datasets.Dataset`` returns tensors rather than Python lists (rows stay in Arrow's memory map)."""
    return data.with_format("torch") if _is_table(data) and hasattr(data, "with_format") else data


def load_data(cfg: Config):
    """``--data``: a token file (tokens.py), ``module:factory``, or a .csv / .npz / .pt file.

    Returns tensors ``(X, y)`` or a source that ``as_samples`` takes (a Dataset, an
    IterableDataset, a DataLoader); y is None when a file has no target (predict).
    """
    path = cfg.data.data
    if is_factory(path):
        return load_data_factory(path)
    if is_token_file(path):
        return TokenWindows(path, cfg.model.seq_len, cfg.data.token_dtype)
    if is_table_path(path):
        return load_table(path)
    return load_file(path, cfg.data.target)


def is_factory(path: str) -> bool:
    """``package.module:factory``: a colon, and no such file (``C:/data.csv`` stays a path)."""
    module, _, attr = path.partition(":")
    return bool(module and attr) and not Path(path).exists() and "/" not in module and "\\" not in module


def load_data_factory(path: str):
    """Import and call ``package.module:factory`` (no arguments); it returns what gpupar.train takes."""
    factory, attr = import_callable(path, "--data"), path.partition(":")[2]
    try:
        data = factory()
    except UsageError:
        raise
    except Exception as exc:  # the user's code failed: say where, in one line
        raise UsageError(f"--data {path!r}: {attr}() raised {type(exc).__name__}: {first_line(exc, '')}") from None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if not isinstance(data, (Dataset, IterableDataset, DataLoader)) and not _is_table(data):
        raise UsageError(f"--data {path!r}: {attr}() returned {type(data).__name__}; accepted: tensors (X, y), a "
                         "torch Dataset, an IterableDataset, a DataLoader or a Hugging Face datasets.Dataset")
    return data


def first_samples(data, count: int = 2):
    """The first ``count`` samples of a source, collated: one batch to probe shapes with,
    without reading the rest (a stream is read only that far)."""
    collate = data.collate_fn if isinstance(data, DataLoader) else default_collate
    data = _torch_format(data.dataset if isinstance(data, DataLoader) else data)
    if isinstance(data, IterableDataset):
        items = list(itertools.islice(iter(data), count))
    else:
        items = [data[i] for i in range(min(count, len(data)))]  # type: ignore[arg-type]
    if not items:
        raise UsageError(f"data: {type(data).__name__} has no samples; expected at least one")
    rows = list(enumerate(items))
    return collate_rows(rows, collate)


TABLE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".arrow": "arrow"}  # read through ``datasets``


def is_table_path(path: str) -> bool:
    """A ``save_to_disk`` directory, or a .parquet / .jsonl / .arrow file (a .csv stays an in-memory table)."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in TABLE_SUFFIXES


def load_table(path: str):
    """A Hugging Face ``datasets.Dataset`` from local files, Arrow memory-mapped (rows are read
    as the batches need them). Its columns are what each sample is: ``x`` and ``y``, or the
    model's keyword arguments (``input_ids``, ``labels``, ...)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--data {path}: file not found (a datasets directory, .parquet, .jsonl or .arrow)")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data {path}: reading it needs the datasets package: pip install 'gpupar[data]'") from None
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its bars were lines on stderr above gpupar's own (an error's one line)
    try:
        if p.is_dir():
            table = datasets.load_from_disk(str(p))
        else:
            table = datasets.load_dataset(TABLE_SUFFIXES[p.suffix.lower()], data_files=str(p), split="train")
    except Exception as exc:  # not a dataset directory, a malformed file: one line
        raise UsageError(f"--data {path}: datasets could not read it ({type(exc).__name__}: {first_line(exc, '')})") \
            from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise UsageError(f"--data {path}: a DatasetDict without a 'train' split (splits: {', '.join(table)})")
        table = table["train"]
    return table
