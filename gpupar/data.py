"""Data: the classic synthetic example, CSV / NPZ / PT loading, and per-rank batch sharding.

Training data is either a pair of tensors ``(X, y)`` or any map-style ``Dataset`` whose
items are ``(x, y)`` pairs. Batches are planned as index lists, so the single-device run
and every data-parallel rank see the same global batches in the same order.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from gpupar.config import Config
from gpupar.errors import UsageError, first_line
from gpupar.weights import refusal

DATA_FORMS = ".csv (with --target), .npz (arrays X and y) or .pt (dict with tensors X and y)"


def synthetic_regression(samples: int = 1000, features: int = 10, noise: float = 0.1,
                         seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic example: x ~ U(0,1)^features, y = sum(x) + noise * N(0,1).

    Returns X [samples, features] and y [samples, 1], both float32.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(samples, features, generator=gen)
    y = X.sum(dim=1, keepdim=True) + noise * torch.randn(samples, 1, generator=gen)
    return X, y


def load_file(path: str, target: str | None = None, need_target: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load X (and y, when the file has it) from a .csv, .npz or .pt file, checked for NaN/Inf."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--data {path}: file not found (accepted: {DATA_FORMS})")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        X, y = _load_csv(p, target, need_target)
    elif suffix == ".npz":
        X, y = _load_npz(p, need_target)
    elif suffix == ".pt":
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but plain tensors and containers
            raise UsageError(f"--data {path}: not a safe tensor file ({refusal(exc)})") from None
        if not isinstance(obj, dict) or "X" not in obj or (need_target and "y" not in obj):
            raise UsageError(f"--data {path}: a .pt file must hold a dict with tensors 'X' and 'y'")
        X = _tensor(obj["X"], path, "X")
        y = _tensor(obj["y"], path, "y") if "y" in obj else None
    else:
        raise UsageError(f"--data {path}: unsupported extension {suffix!r}; accepted: {DATA_FORMS}")
    for name, t in (("X", X), ("y", y)):
        if t is not None and t.dim() == 0:
            raise UsageError(f"--data {path}: {name} is a single number; expected one row per sample")
    if X.dim() == 1:
        X = X[:, None]
    if len(X) == 0:
        raise UsageError(f"--data {path}: X has 0 rows; expected at least one sample")
    if X.dim() == 2 and X.shape[1] == 0:
        raise UsageError(f"--data {path}: no feature columns"
                         + (f" besides the target {target!r}" if target else "")
                         + "; expected at least one input feature")
    for name, t in (("X", X), ("y", y)):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).nonzero()[0, 0])
            raise UsageError(f"--data {path}: {name} holds NaN or Inf (first at data row {bad + 1}); "
                             "clean the data first")
    if y is not None and len(y) != len(X):
        raise UsageError(f"--data {path}: X has {len(X)} rows but y has {len(y)}")
    return X, y


def _load_npz(p: Path, need_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X (and y) from an .npz archive; pickled (object) arrays are refused, never loaded."""
    try:
        arrays = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"--data {p}: not a readable .npz archive ({first_line(exc)}); "
                         "expected arrays X and y saved with numpy.savez") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):  # a bare .npy renamed to .npz
        raise UsageError(f"--data {p}: a single array, not an .npz archive; save X and y with numpy.savez")
    with arrays:
        if "X" not in arrays or (need_target and "y" not in arrays):
            raise UsageError(f"--data {p}: an .npz needs arrays 'X' and 'y', found {sorted(arrays)}")
        try:
            X = _tensor(arrays["X"], str(p), "X")
            y = _tensor(arrays["y"], str(p), "y") if "y" in arrays else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays, a damaged member
            raise UsageError(f"--data {p}: cannot read its arrays ({first_line(exc)}); "
                             "expected numeric arrays X and y") from None
    return X, y


def _tensor(array, path: str, name: str) -> torch.Tensor:
    if not isinstance(array, torch.Tensor):
        array = np.asarray(array)
        if array.dtype.kind not in "iuf":  # strings, objects, bools, complex: not features
            raise UsageError(f"--data {path}: array {name} has dtype {array.dtype}; expected numbers "
                             "(integers or floats)")
    t = torch.as_tensor(array) if not isinstance(array, torch.Tensor) else array
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)):
        raise UsageError(f"--data {path}: array {name} has dtype {t.dtype}; expected numbers")
    return t.float() if t.is_floating_point() else t.long()


def _load_csv(p: Path, target: str | None, need_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:  # a BOM (Excel) is not part of the header
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise UsageError(f"--data {p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise UsageError(f"--data {p}: not a readable CSV ({first_line(exc)})") from None
    if len(rows) < 2:
        raise UsageError(f"--data {p}: a CSV needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if target is None and need_target:
        raise UsageError(f"--data {p}: a CSV needs --target COLUMN; columns are: {', '.join(header)}")
    if target is not None and target not in header:
        if need_target:
            raise UsageError(f"--target {target!r} is not a column of {p}; columns are: {', '.join(header)}")
        target = None
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise UsageError(f"--data {p}: data row {r + 1} has {len(row)} fields, the header has {len(header)}")
        for c, cell in enumerate(row):
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise UsageError(f"--data {p}: column {header[c]!r} data row {r + 1} is not numeric ({cell!r}); "
                                 "only numeric columns are accepted") from None
    data = torch.from_numpy(values).float()
    if target is None:
        return data, None
    t = header.index(target)
    keep = [c for c in range(len(header)) if c != t]
    return data[:, keep], data[:, t:t + 1]




def prepare_targets(y: torch.Tensor, task: str) -> torch.Tensor:
    """Regression targets become float [N, 1] (or [N, k]); classification targets int64 [N]."""
    if task == "classification":
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise UsageError("--task classification needs integer class labels in the target")
        if len(y) and int(y.min()) < 0:
            bad = int((y.reshape(len(y), -1) < 0).any(dim=1).nonzero()[0, 0])
            raise UsageError(f"--task classification: label {int(y.min())} (first negative at data row {bad + 1}) "
                             "is negative; class labels must be 0, 1, 2, ...")
        return y.reshape(-1).long()
    y = y.float()
    return y[:, None] if y.dim() == 1 else y


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
    index: torch.Tensor  # [n] positions into a Dataset source (tensors are stored already gathered)
    collate_fn: Callable = default_collate
    workers: int = 0
    pin_memory: bool = False

    @classmethod
    def of(cls, data, index: torch.Tensor, **loading) -> "Samples":
        if isinstance(data, (tuple, list)):
            X, y = data
            return cls((X[index], y[index]), torch.arange(len(index)))
        return cls(data, index, **loading)

    def __len__(self) -> int:
        return len(self.index)

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
        return self.collate([int(i) for i in self.index[positions]])

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
    """A collated batch (a pytree of tensors) on ``device``; copies from pinned memory do not wait."""
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def batch_rows(batch) -> int:
    """Samples in a collated batch: the leading size of its first tensor."""
    return next((int(t.shape[0]) for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()), 1)


def epoch_batches(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of one epoch as index tensors; identical on every rank.

    The last short batch is dropped when the data do not divide into whole batches,
    so that every optimizer step sees a full global batch on every rank.
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    full = n // batch_size
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(full)]


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


# A Dataset collated whole at every step would climb in memory without a word: past this many
# samples, a Dataset source needs a batch size.
FULL_BATCH_LIMIT = 4096


def as_samples(data, cfg: Config) -> tuple[Samples, Samples | None]:
    """The user's data, split into train and validation samples.

    Accepted: tensors ``(X, y)`` (a 1-D float ``y`` is one output column, as the classic
    example writes it); a map-style Dataset whose items ``default_collate`` takes; a
    DataLoader over one, whose dataset, ``collate_fn``, ``num_workers`` and ``pin_memory`` are
    kept and whose ``batch_size`` is the GLOBAL batch (the model's math does not change with
    the number of ranks); its shuffling becomes gpupar's seeded shuffle, the same on every rank.
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
        raise UsageError("data: an IterableDataset is not supported yet; pass a map-style Dataset "
                         "(__getitem__ and __len__), a DataLoader over one, or tensors (X, y)")
    elif isinstance(data, Dataset):
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
                         "Dataset, or a DataLoader over one")
    train_idx, val_idx = split_validation(n, cfg.data.val_fraction, cfg.train.seed)
    train_set = Samples.of(data, train_idx, **loading)
    return train_set, (Samples.of(data, val_idx, **loading) if len(val_idx) else None)


def _from_loader(loader: DataLoader, cfg: Config) -> tuple[Dataset, dict]:
    """A user's DataLoader: its dataset and loading options; its batch size is the global batch."""
    from torch.utils.data import RandomSampler, SequentialSampler

    sampler = loader.sampler if loader.batch_size is not None else None
    if not isinstance(sampler, (RandomSampler, SequentialSampler)):
        raise UsageError(f"data: a DataLoader with {type(loader.sampler).__name__ if sampler is None else type(sampler).__name__}"
                         " and batch_size " f"{loader.batch_size}: gpupar plans the batches itself, so pass "
                         "batch_size=N and shuffle=True/False (no sampler or batch_sampler)")
    if cfg.train.batch_size is None:
        cfg.train.batch_size = loader.batch_size
    elif cfg.train.batch_size != loader.batch_size:
        raise UsageError(f"data: the DataLoader's batch_size {loader.batch_size} differs from "
                         f"config.train.batch_size {cfg.train.batch_size}; set one of them")
    cfg.data.shuffle = cfg.data.shuffle or isinstance(sampler, RandomSampler)
    return loader.dataset, {"collate_fn": loader.collate_fn, "workers": loader.num_workers,
                            "pin_memory": loader.pin_memory}
