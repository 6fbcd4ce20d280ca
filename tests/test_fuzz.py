"""Random flag values and malformed files: gpupar accepts them or refuses them in one line
(exit 2, UsageError), never with an uncaught exception, and never writes outside the
test's own directory. Bounded: few examples each, so the module stays under a minute."""

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from gpupar.checkpoint import check_trainer, restore_rng
from gpupar.cli import main
from gpupar.config_file import load_toml
from gpupar.data import load_file, prepare_targets
from gpupar.errors import UsageError

from conftest import REPO

FUZZ = settings(max_examples=int(os.environ.get("GPUPAR_FUZZ_EXAMPLES", 25)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

numbers = st.one_of(st.integers(-10**25, 10**25), st.integers(-3, 3),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300]))
values = st.one_of(numbers.map(str), st.text(max_size=8), st.sampled_from(["", " ", "nan", "-inf", "1e999", "0x10"]))
FLAGS = ["--seed", "--weight-decay", "--lr", "--epochs", "--heads", "--vocab", "--seq-len", "--batch-size",
         "--val-fraction", "--noise", "--samples", "--warmup-steps", "--clip-grad-norm", "--log-every",
         "--hidden", "--layers", "--grad-accum", "--max-steps", "--task", "--optimizer", "--loss"]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh directory per example as the working directory; fails if anything appears
    outside it (in the repository, or beside the test's own tmp directory)."""
    monkeypatch.chdir(tmp_path)
    watched = [REPO, REPO / "tests", tmp_path.parent]
    before = {d: set(os.listdir(d)) for d in watched}

    def new_dir() -> Path:
        return Path(tempfile.mkdtemp(dir=tmp_path))

    yield new_dir
    for d in watched:
        assert set(os.listdir(d)) == before[d], f"wrote outside the test directory: {set(os.listdir(d)) ^ before[d]}"


def refused_in_one_line(code: int, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("gpupar: error: "), err


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(FLAGS), values), min_size=1, max_size=4),
       model=st.sampled_from(["simple-nn", "mlp", "gpt"]))
def test_random_flag_values_print_config_or_one_line(gpupar, sandbox, flags, model):
    argv = ["train", "--model", model, "--print-config"] + [part for pair in flags for part in pair]
    code, out, err = gpupar(*argv)
    refused_in_one_line(code, err)


@FUZZ
@given(seed=st.one_of(st.integers(-5, 5), st.integers(2**32 - 2, 2**70)), wd=numbers,
       epochs=st.integers(-1, 2))
def test_random_flags_in_a_small_run(gpupar, sandbox, seed, wd, epochs):
    run_dir = sandbox() / "run"
    code, out, err = gpupar("train", "--samples", 16, "--epochs", epochs, "--seed", seed, "--weight-decay", wd,
                            "--shuffle", "--batch-size", 4, "--run-dir", run_dir)
    refused_in_one_line(code, err)


cells = st.one_of(numbers.map(str), st.text(max_size=5), st.sampled_from(["", "nan", "1", "-1", "2.5"]))


@st.composite
def csv_bytes(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=60))
    header = draw(st.lists(st.sampled_from(["a", "b", "t", " t", "", "t,t", '"q"']), min_size=0, max_size=4))
    rows = draw(st.lists(st.lists(cells, max_size=5), max_size=5))
    text = "\n".join(",".join(r) for r in [header, *rows])
    return text.encode(draw(st.sampled_from(["utf-8", "latin-1", "utf-16"])), errors="replace")


@FUZZ
@given(content=csv_bytes(), task=st.sampled_from(["regression", "classification"]),
       need_target=st.booleans())
def test_malformed_csv_loads_or_is_refused(sandbox, content, task, need_target):
    path = sandbox() / "d.csv"
    path.write_bytes(content)
    try:
        X, y = load_file(str(path), "t", need_target=need_target)
        if y is not None:
            prepare_targets(y, task)
    except UsageError as exc:
        assert "\n" not in str(exc)


arrays = st.one_of(
    st.tuples(st.sampled_from(["f8", "f4", "i8", "u1", "U3", "O", "?", "c8"]),
              st.lists(st.integers(0, 3), max_size=3)).map(lambda a: _array(*a)),
    st.floats(allow_nan=True).map(np.float64))


def _array(dtype: str, shape: list[int]) -> np.ndarray:
    data = np.random.default_rng(0).normal(size=shape)
    if dtype == "O":
        return np.array([{"x": 1}] * int(np.prod(shape)), dtype=object).reshape(shape)
    return data.astype(dtype)


@FUZZ
@given(x=arrays, y=st.one_of(st.none(), arrays), garbage=st.one_of(st.none(), st.binary(max_size=40)))
def test_malformed_npz_loads_or_is_refused(sandbox, x, y, garbage):
    path = sandbox() / "d.npz"
    if garbage is not None:
        path.write_bytes(garbage)
    else:
        with path.open("wb") as fh:  # savez pickles object arrays; loading must refuse them
            np.savez(fh, X=x, **({} if y is None else {"y": y}))
    try:
        load_file(str(path), need_target=bool(garbage) or y is not None)
    except UsageError as exc:
        assert "\n" not in str(exc)


toml_text = st.one_of(
    st.binary(max_size=60),
    st.lists(st.tuples(st.sampled_from(["model", "train", "optim", "data", "nosuch"]),
                       st.sampled_from(["name", "seed", "lr", "epochs", "heads", "weight_decay", "x"]),
                       st.one_of(numbers.map(lambda v: str(v).replace("inf", "inf").lower()),
                                 st.text(max_size=5).map(json.dumps), st.just("[1, 2]"), st.just("true"))),
             max_size=4).map(lambda kv: "\n".join(f"[{s}]\n{k} = {v}" for s, k, v in kv).encode()))


@FUZZ
@given(content=toml_text)
def test_malformed_toml_loads_or_is_refused(gpupar, sandbox, content):
    path = sandbox() / "c.toml"
    path.write_bytes(content)
    try:
        load_toml(path).validate()
    except UsageError as exc:
        assert "\n" not in str(exc)
    refused_in_one_line(*gpupar("train", "--config", path, "--print-config")[::2])


json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers.filter(lambda v: v == v and abs(v) < 1e30),
                                     st.text(max_size=4)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(
                                                       ["position", "step", "epoch", "batch", "scheduler", "torch",
                                                        "python", "numpy", "x"]), inner, max_size=4)),
                           max_leaves=10)


@FUZZ
@given(trainer=json_values, rng=json_values)
def test_malformed_checkpoint_json_is_refused_naming_the_file(sandbox, trainer, rng):
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        for check, value, name in ((check_trainer, trainer, "trainer.json"), (restore_rng, rng, "rank-0.json")):
            try:
                check(json.loads(json.dumps(value)), Path("ckpt") / name)
            except UsageError as exc:
                assert name in str(exc) and "\n" not in str(exc)
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


# --- the files gpupar reads back from a run (issue 26): one line or success, never a traceback,
# never a read or write outside the run, never longer than a bound ----------------------------

BOUND_S = 10.0  # one example's parse, on a loaded 2-core machine; the files are a few KB
json_text = st.one_of(json_values.map(json.dumps), st.text(max_size=40),
                      st.integers(1, 3000).map(lambda n: "[" * n * 30 + "]" * n * 30),
                      st.sampled_from(['{"step": "1", "loss": [1]}', '{"get": 1, "__class__": 2}', "NaN", "{"]))


def _bounded(start: float) -> None:
    import time

    assert time.monotonic() - start < BOUND_S


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 8))  # each example draws a plot: ~1 s
@given(summary=json_text, metrics=st.lists(json_text, max_size=4), config=toml_text)
def test_run_files_list_and_plot_or_are_refused(gpupar, sandbox, summary, metrics, config):
    """`gpupar runs` and `gpupar report` over a run whose summary.json, metrics.jsonl and
    config.toml hold anything: exit 0, or one line and exit 2; the plot goes where it is asked."""
    import time

    run = sandbox() / "R"
    run.mkdir()
    (run / "summary.json").write_text(summary)
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    (run / "config.toml").write_bytes(config)
    start = time.monotonic()
    code, _, err = gpupar("runs", run.parent)
    refused_in_one_line(code, err)
    code, _, err = gpupar("report", run, "--out", run / "l.png")
    assert code in (0, 2), err
    if code == 2:  # report notes unreadable lines on stderr before its one line of refusal
        assert err.strip().splitlines()[-1].startswith("gpupar: error: "), err
    _bounded(start)
    assert set(os.listdir(run)) <= {"summary.json", "metrics.jsonl", "config.toml", "l.png"}


shard_paths = st.one_of(st.sampled_from(["__0_0.distcp", "../x.distcp", "/etc/passwd", "sub/../__0_0.distcp",
                                         "fifo", "link", ".", "", "nosuch"]), st.text(max_size=12))


@FUZZ
@given(paths=st.lists(shard_paths, min_size=1, max_size=4), offsets=st.lists(st.integers(-2, 10**6), min_size=2,
                                                                              max_size=2))
def test_dcp_shard_records_stay_inside_their_checkpoint(sandbox, paths, offsets):
    """DCP metadata's shard records, generated: check_storage accepts only regular files inside
    the checkpoint, with every slice inside its file, and refuses anything else with a ValueError
    (one line) before anything is opened; a FIFO is never opened (it would block for ever)."""
    import stat

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    from gpupar.safe_dcp import check_storage

    ckpt = sandbox() / "ckpt"
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 100)
    os.mkfifo(ckpt / "fifo")
    (ckpt / "link").symlink_to("/etc/hostname")
    storage = {MetadataIndex(f"k{i}"): _StorageInfo(p, offsets[0], offsets[1]) for i, p in enumerate(paths)}
    meta = Metadata(state_dict_metadata={}, storage_data=storage)
    try:
        check_storage(meta, ckpt)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    for info in storage.values():  # accepted: every record is a regular file inside, the slice within it
        real = (ckpt / info.relative_path).resolve()
        assert ckpt.resolve() in real.parents and stat.S_ISREG(os.stat(real).st_mode), info
        assert info.offset + info.length <= real.stat().st_size, info


@FUZZ
@given(marker=st.one_of(json_text, st.just("ok\n"), st.builds(lambda files: json.dumps(
    {"format": 1, "sha256": files}), st.dictionaries(st.sampled_from(["a", "../a", "b/c", "COMPLETE"]),
                                                     st.sampled_from(["0" * 64, "x", ""]), max_size=3))))
def test_a_checkpoints_complete_marker_is_held_or_refused_in_one_line(sandbox, marker):
    from gpupar.errors import UsageError
    from gpupar.safe_dcp import check_seal

    ckpt = sandbox() / "step-1"
    ckpt.mkdir()
    (ckpt / "a").write_bytes(b"data")
    (ckpt / "COMPLETE").write_text(marker)
    try:
        check_seal(ckpt, "--resume x")
    except UsageError as exc:
        assert "\n" not in str(exc) and "corrupt checkpoint" in str(exc)


@FUZZ
@given(records=st.lists(st.tuples(st.integers(0, 3), json_values), max_size=4))
def test_a_ranks_collective_record_never_breaks_the_launchers_message(sandbox, records):
    from gpupar.launch.collectives import story

    directory = sandbox()
    for rank, body in records:
        (directory / f"rank-{rank}.json").write_text(json.dumps(body))
    assert "\n" not in story(directory, 2)
