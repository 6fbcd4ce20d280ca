"""Data from files: the classic synthetic example and CSV / NPZ / PT loading, checked once.

Everything here fits in memory by design (the classic example's scale); data bigger than
memory comes as token files (tokens.py), a Dataset or an IterableDataset (sources.py).
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import torch

from gpupar.errors import UsageError, first_line
from gpupar.weights import load_plain, refusal

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
            obj = load_plain(p)
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
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:  # `a,y,y --target y` trained with the second y as a feature
        raise UsageError(f"--data {p}: column name(s) {', '.join(map(repr, twice))} appear more than once in the "
                         "header; give every column its own name")
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
