"""Adversarial cases on what a user hands gpupar: weights files and data files (CSV, .npz,
.pt, ``module:factory``, a FIFO or a device where a file belongs). All are fast: no ranks,
no signals."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from adversarial_kit import TRAIN, case, csv, judge, reads_back

# --- weights that predict reads --------------------------------------------------------------


def _predict(ctx, weights: Path, **kw):
    r = ctx.run("predict", "--weights", weights, "--data", ctx.root / "x.csv", "--out", ctx.dir / "p.csv",
                timeout=kw.pop("timeout", 60))
    return judge(r, needles=[weights.name], **kw)


def _beside_run(ctx, name: str, content: bytes) -> Path:
    """``name`` written in a copy of the base run, so predict finds the run's config.toml."""
    run = ctx.base()
    (run / name).write_bytes(content)
    return run / name


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@case("traceback")
def weights_safetensors_header_length_huge(ctx):
    return _predict(ctx, _beside_run(ctx, "model.safetensors", struct.pack("<Q", 1 << 60) + b"{}"))


@case("traceback")
def weights_safetensors_header_not_json(ctx):
    return _predict(ctx, _beside_run(ctx, "model.safetensors", struct.pack("<Q", 8) + b"\xff\xfe{[}]\x00\x01"))


@case("traceback")
def weights_safetensors_shape_beyond_the_file(ctx):
    header = {"0.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    return _predict(ctx, _beside_run(ctx, "model.safetensors", _safetensors(header, b"\0" * 64)))


@case("traceback")
def weights_safetensors_empty_file(ctx):
    return _predict(ctx, _beside_run(ctx, "model.safetensors", b""))


def _retensored(ctx, edit) -> Path:
    """The base run's weights, edited as a dict of tensors and saved again as safetensors."""
    from safetensors.torch import load_file, save_file

    run = ctx.base()
    state = load_file(str(run / "model.safetensors"))
    save_file(edit(state), str(run / "model.safetensors"))
    return run / "model.safetensors"


@case("traceback")
def weights_missing_a_tensor(ctx):
    return _predict(ctx, _retensored(ctx, lambda s: dict(list(s.items())[1:])))


@case("traceback")
def weights_with_a_wrong_shape(ctx):
    import torch

    return _predict(ctx, _retensored(ctx, lambda s: {k: torch.zeros(3, 3) for k in s}))


@case("silent")
def weights_integer_dtype(ctx):
    """Integer tensors where float weights belong: cast silently to a model of zeros and ones."""
    return _predict(ctx, _retensored(ctx, lambda s: {k: (v > 0).to(__import__("torch").int64) for k, v in s.items()}))


@case("silent")
def weights_with_nan(ctx):
    """NaN weights predict NaN for every row: a file of NaN with exit 0 is a wrong result."""
    import torch

    path = _retensored(ctx, lambda s: {k: torch.full_like(v, float("nan")) for k, v in s.items()})
    r = ctx.run("predict", "--weights", path, "--data", ctx.root / "x.csv", "--out", ctx.dir / "p.csv")
    out = ctx.dir / "p.csv"
    nan = out.is_file() and "nan" in out.read_text().lower()
    return judge(r, wrong="predictions of NaN weights, written with exit 0" if nan and r.code == 0 else None)


@case("traceback")
def weights_pt_truncated(ctx):
    import torch
    from safetensors.torch import load_file

    path = ctx.dir / "w.pt"
    torch.save(load_file(str(ctx.root / "base/model.safetensors")), path)
    path.write_bytes(path.read_bytes()[:-40])
    return _predict(ctx, path)


@case("traceback")
def weights_pt_not_a_dict(ctx):
    import torch

    path = ctx.dir / "w.pt"
    torch.save([torch.zeros(2)], path)
    return _predict(ctx, path)


@case("traceback")
def weights_is_a_directory(ctx):
    (ctx.dir / "w.safetensors").mkdir()
    return _predict(ctx, ctx.dir / "w.safetensors")


@case("hang")
def weights_is_a_fifo(ctx):
    os.mkfifo(ctx.dir / "w.safetensors")
    return _predict(ctx, ctx.dir / "w.safetensors", timeout=30)


# --- data files --------------------------------------------------------------------------------


def _train_on(ctx, data: Path | str, *extra, needles=(), timeout: float = 120):
    r = ctx.run(*TRAIN, "--data", data, *extra, "--run-dir", ctx.dir / "R", timeout=timeout)
    return judge(r, needles=list(needles), left=ctx.dir / "R")


def _csv_text(ctx, text: str, *extra, needles=("d.csv",)):
    (ctx.dir / "d.csv").write_text(text)
    return _train_on(ctx, ctx.dir / "d.csv", *extra, needles=needles)


@case("traceback")
def csv_empty_file(ctx):
    return _csv_text(ctx, "")


@case("traceback")
def csv_header_only(ctx):
    return _csv_text(ctx, "a,b,y\n", "--target", "y")


@case("traceback")
def csv_ragged_rows(ctx):
    return _csv_text(ctx, "a,b,y\n1,2,3\n4,5\n6,7,8,9\n" + "1,2,3\n" * 20, "--target", "y")


@case("traceback")
def csv_non_numeric_cell(ctx):
    return _csv_text(ctx, "a,b,y\n" + "1,2,3\n" * 10 + "1,two,3\n" + "1,2,3\n" * 10, "--target", "y")


@case("silent")
def csv_nan_cell(ctx):
    """A NaN feature trains a model of NaN (or stops at step 1): refused when the file is read."""
    return _csv_text(ctx, "a,b,y\n" + "1,2,3\n" * 10 + "1,nan,3\n" + "1,2,3\n" * 10, "--target", "y")


@case("silent")
def csv_infinite_target(ctx):
    return _csv_text(ctx, "a,b,y\n" + "1,2,3\n" * 10 + "1,2,inf\n" + "1,2,3\n" * 10, "--target", "y")


@case("late")
def csv_with_a_byte_order_mark(ctx):
    """Excel's UTF-8 CSV starts with a BOM: its first column is still ``y``."""
    (ctx.dir / "d.csv").write_bytes(b"\xef\xbb\xbfy,a,b\n" + b"3,1,2\n" * 20)
    r = ctx.run(*TRAIN, "--data", ctx.dir / "d.csv", "--target", "y", "--run-dir", ctx.dir / "R")
    return judge(r, expect=(0,))


@case("traceback")
def csv_target_not_a_column(ctx):
    return _csv_text(ctx, "a,b,y\n" + "1,2,3\n" * 20, "--target", "z", needles=("z",))


@case("traceback")
def csv_only_the_target_column(ctx):
    return _csv_text(ctx, "y\n" + "3\n" * 20, "--target", "y")


@case("silent")
def csv_duplicate_columns_without_target(ctx):
    return _csv_text(ctx, "a,a,b\n" + "1,2,3\n" * 20, needles=("a",))


@case("late")
def csv_very_long_column_name(ctx):
    data = ctx.dir / "d.csv"
    csv(data, header="a" * 100000 + ",b,y")
    run = ctx.dir / "R"
    r = ctx.run(*TRAIN, "--data", data, "--target", "y", "--run-dir", run)
    return reads_back(ctx, r, run)


@case("late")
def csv_column_names_with_quotes_and_unicode(ctx):
    data = ctx.dir / "d.csv"
    data.write_text('"a\\"b",\'c\',"ü ∂ \\u0000 \t",y\n' + "1,2,3,4\n" * 20)
    run = ctx.dir / "R"
    return reads_back(ctx, ctx.run(*TRAIN, "--data", data, "--target", "y", "--run-dir", run), run)


def _npz(ctx, **arrays):
    import numpy as np

    with open(ctx.dir / "d.npz", "wb") as fh:
        np.savez(fh, **arrays)
    return _train_on(ctx, ctx.dir / "d.npz", needles=("d.npz",))


@case("traceback")
def npz_without_y(ctx):
    import numpy as np

    return _npz(ctx, X=np.zeros((64, 10), np.float32))


@case("traceback")
def npz_x_and_y_of_other_lengths(ctx):
    import numpy as np

    return _npz(ctx, X=np.zeros((64, 10), np.float32), y=np.zeros(63, np.float32))


@case("traceback")
def npz_complex_features(ctx):
    import numpy as np

    return _npz(ctx, X=np.zeros((64, 10), np.complex64), y=np.zeros(64, np.float32))


@case("silent")
def npz_nan_features(ctx):
    import numpy as np

    X = np.zeros((64, 10), np.float32)
    X[7, 3] = np.nan
    return _npz(ctx, X=X, y=np.zeros(64, np.float32))


@case("traceback")
def npz_truncated(ctx):
    import numpy as np

    _npz_file = ctx.dir / "d.npz"
    with open(_npz_file, "wb") as fh:
        np.savez(fh, X=np.zeros((64, 10), np.float32), y=np.zeros(64, np.float32))
    _npz_file.write_bytes(_npz_file.read_bytes()[:300])
    return _train_on(ctx, _npz_file, needles=("d.npz",))


@case("traceback")
def pt_data_of_wrong_types(ctx):
    import torch

    torch.save({"X": "not a tensor", "y": [1, 2]}, ctx.dir / "d.pt")
    return _train_on(ctx, ctx.dir / "d.pt", needles=("d.pt",))


@case("hang")
def data_csv_is_a_fifo(ctx):
    os.mkfifo(ctx.dir / "d.csv")
    return _train_on(ctx, ctx.dir / "d.csv", needles=("d.csv",), timeout=30)


@case("hang")
def data_csv_is_dev_zero(ctx):
    (ctx.dir / "d.csv").symlink_to("/dev/zero")
    return _train_on(ctx, ctx.dir / "d.csv", needles=("d.csv",), timeout=30)


DATA_FACTORIES = '''
def returns_none():
    return None


def returns_a_string():
    return "rows"


def raises():
    raise RuntimeError("the data server is down")


def needs_an_argument(path):
    return path
'''


def _factory(ctx, name: str):
    (ctx.dir / "adv_data.py").write_text(DATA_FACTORIES)
    return _train_on(ctx, f"adv_data:{name}", needles=(name,))


@case("traceback")
def data_factory_returns_none(ctx):
    return _factory(ctx, "returns_none")


@case("traceback")
def data_factory_returns_a_string(ctx):
    return _factory(ctx, "returns_a_string")


@case("traceback")
def data_factory_raises(ctx):
    return _factory(ctx, "raises")


@case("traceback")
def data_factory_needs_an_argument(ctx):
    return _factory(ctx, "needs_an_argument")
