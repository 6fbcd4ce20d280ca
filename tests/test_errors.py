"""Issue 14: every bad input is one line on stderr, exit code 2, naming the value and what is
accepted; no traceback, no stray or half-written file."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpupar.cli import main
from gpupar.weights import save_weights

from harness import env

TRAIN = ("train", "--epochs", 2, "--samples", 64)


def one_line_error(result: tuple[int, str, str], *needles: str) -> None:
    """(exit code, stdout, stderr): exit 2 and exactly one line on stderr, starting as the
    CLI's errors do, holding every needle."""
    code, _, err = result
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("gpupar: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run with a checkpoint at step 2 (shared by the tests that read one)."""
    run_dir = tmp_path_factory.mktemp("run") / "R"
    assert main([str(a) for a in (*TRAIN, "--checkpoint-every", 2, "--run-dir", run_dir)]) == 0
    return run_dir


# --------------------------------------------------------------------------- data files

def test_non_utf8_csv_and_toml(gpupar, tmp_path):
    csv = tmp_path / "latin.csv"
    csv.write_bytes("a,t\n1,\xe9\n".encode("latin-1"))
    one_line_error(gpupar(*TRAIN, "--data", csv, "--target", "t"), f"--data {csv}", "not UTF-8", "0xe9")
    toml = tmp_path / "latin.toml"
    toml.write_bytes('[model]\nname = "\xe9"\n'.encode("latin-1"))
    one_line_error(gpupar("train", "--config", toml, "--print-config"), f"--config {toml}", "not UTF-8")


def test_npz_with_strings_objects_or_no_rows(gpupar, tmp_path):
    np.savez(tmp_path / "str.npz", X=np.array([["a", "b"]]), y=np.array([1.0]))
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "str.npz"), "array X has dtype <U1", "expected numbers")
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "obj.npz"), "obj.npz", "expected numeric arrays")
    np.savez(tmp_path / "empty.npz", X=np.zeros((0, 3)), y=np.zeros(0))
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "empty.npz"), "X has 0 rows",
                   "expected at least one sample")


def test_integer_features_are_cast_with_a_note_unless_the_model_takes_ids(gpupar, tmp_path, monkeypatch, capsys):
    import gpupar as gp
    from gpupar.models import check_shapes
    from gpupar.problem import integer_features

    (tmp_path / "ids.py").write_text("import torch\n\n\n"
                                     "def embedding():\n"
                                     "    return torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Flatten(),"
                                     " torch.nn.Linear(40, 1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ints = np.arange(640).reshape(64, 10) % 50
    np.savez(tmp_path / "i.npz", X=ints, y=np.arange(64, dtype=np.float32))
    torch.save({"X": torch.from_numpy(ints).int(), "y": torch.ones(64)}, tmp_path / "i.pt")
    for data in ("i.npz", "i.pt"):  # int32 is read as int64
        code, _, err = gpupar(*TRAIN, "--data", tmp_path / data, "--run-dir", tmp_path / data.replace(".", "-"))
        assert code == 0, err
        assert err == f"gpupar: note: --data {tmp_path / data}: integer features (int64) cast to float32, " \
                      "the dtype of the model's weights\n"  # once, though the problem is loaded twice
    code, _, err = gpupar("predict", "--weights", tmp_path / "i-npz" / "model.safetensors", "--data",
                          tmp_path / "i.npz", "--out", tmp_path / "p.csv")  # predict takes them as training did
    assert code == 0 and len((tmp_path / "p.csv").read_text().splitlines()) == 65, err
    code, _, err = gpupar(*TRAIN, "--data", tmp_path / "i.npz", "--model", "ids:embedding", "--run-dir", tmp_path / "e")
    assert (code, err) == (0, "")  # token ids stay integer: an embedding takes them as they are
    # On the meta device a Linear takes int64 without a word: the hooks tell there.
    X, y = torch.from_numpy(ints[:4]), torch.zeros(4, 1)
    for build, kept in ((lambda: torch.nn.Linear(10, 1), False),
                        (lambda: torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Flatten(),
                                                     torch.nn.Linear(40, 1)), True)):
        with torch.device("meta"):
            model = build()
        features, _, note = integer_features(X, model, lambda x: check_shapes(model, x.to("meta"), y, "regression"))
        assert (features.dtype == torch.int64) == kept and (note is None) == kept
    # A Dataset is read a batch at a time: integer features a Linear cannot take are refused before launch.
    (tmp_path / "sets.py").write_text("import torch\n\n\n"
                                      "def ints():\n"
                                      "    return torch.utils.data.TensorDataset(torch.arange(640).reshape(64, 10) % 50,"
                                      " torch.ones(64, 1))\n")
    one_line_error(gpupar(*TRAIN, "--data", "sets:ints", "--run-dir", tmp_path / "s"),
                   "--data sets:ints: the features are int64 and the model takes float32")
    assert not (tmp_path / "s").exists()
    assert gpupar(*TRAIN, "--data", "sets:ints", "--model", "ids:embedding", "--run-dir", tmp_path / "s")[0] == 0
    capsys.readouterr()
    cfg = gp.Config()
    cfg.train.epochs = 2
    gp.train(torch.nn.Linear(10, 1), (torch.from_numpy(ints), torch.ones(64)), config=cfg)  # the Python API
    assert "gpupar: note: data: integer features (int64) cast to float32" in capsys.readouterr().err


def test_csv_without_feature_columns_is_refused(gpupar, tmp_path):
    (tmp_path / "t.csv").write_text("t\n1\n2\n3\n4\n")
    code, out, err = gpupar(*TRAIN, "--data", tmp_path / "t.csv", "--target", "t", "--run-dir", tmp_path / "r")
    one_line_error((code, out, err), "no feature columns besides the target 't'")
    assert not (tmp_path / "r").exists()


def test_negative_class_label(gpupar, tmp_path):
    (tmp_path / "c.csv").write_text("a,t\n1,0\n2,1\n3,-1\n4,1\n")
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "c.csv", "--target", "t", "--task", "classification"),
                   "label -1", "data row 3", "class labels must be 0, 1, 2")


def test_data_rows_are_counted_from_1_in_every_message(gpupar, tmp_path):
    (tmp_path / "a.csv").write_text("a,t\nx,1\n2,1\n")
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "a.csv", "--target", "t"), "data row 1 is not numeric")
    (tmp_path / "b.csv").write_text("a,t\n1,1\n2\n")
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "b.csv", "--target", "t"), "data row 2 has 1 fields")
    np.savez(tmp_path / "n.npz", X=np.array([[np.nan], [1.0]]), y=np.zeros(2))
    one_line_error(gpupar(*TRAIN, "--data", tmp_path / "n.npz"), "NaN or Inf (first at data row 1)")


# --------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, needles", [
    (("--seed", "99999999999999999999999"), ("--seed 99999999999999999999999", "0 to 4294967295")),
    (("--seed", "-1"), ("--seed -1", "0 to 4294967295")),
    (("--weight-decay", "-1"), ("--weight-decay -1.0", ">= 0")),
    (("--lr", "1e300"), ("--lr 1e+300 is too large", "at most 3.403e+38")),
    (("--model", "gpt", "--heads", "0"), ("--heads 0", "positive integer")),
    (("--model", "gpt", "--vocab", "0"), ("--vocab 0", "positive integer")),
    (("--model", "gpt", "--seq-len", "0"), ("--seq-len 0", "positive integer")),
])
def test_flags_out_of_range(gpupar, flags, needles):
    one_line_error(gpupar("train", *flags, "--print-config"), *needles)


def test_sweep_grid_is_capped_and_empty_lists_are_refused(gpupar, tmp_path):
    one_line_error(gpupar("sweep", "--seeds", "0-999999999999", "--run-dir", tmp_path / "s"),
                   "--seeds '0-999999999999'", "at most 100000 models")
    one_line_error(gpupar("sweep", "--seeds", "5000000000", "--run-dir", tmp_path / "s"),
                   "seed 5000000000 is out of range; accepted: 0 to 4294967295")
    one_line_error(gpupar("sweep", "--seeds", "0-999", "--lr", ",".join(f"{0.001 * (i + 1):g}" for i in range(101)), "--run-dir", tmp_path),
                   "1000 seeds x 101 learning rates", "at most 100000")
    one_line_error(gpupar("sweep", "--lr", "", "--run-dir", tmp_path / "s"), "--lr ''", "comma-separated list")
    one_line_error(gpupar("sweep", "--hidden", "", "--run-dir", tmp_path / "s"), "--hidden ''")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- user models

def test_model_factory_that_raises_or_needs_arguments(gpupar):
    one_line_error(gpupar(*TRAIN, "--model", "user_models:raises"),
                   "--model 'user_models:raises'", "raises() raised KeyError", "no_such_layer")
    one_line_error(gpupar(*TRAIN, "--model", "user_models:needs_args"),
                   "needs_args() needs arguments (in_features)")


class _Output(torch.nn.Module):
    """Linear(10, 1) whose forward ends in ``how``: what no loss can take a gradient through."""

    def __init__(self, how=lambda y: y):
        super().__init__()
        self.fc, self.how = torch.nn.Linear(10, 1), how

    def forward(self, x):
        return self.how(self.fc(x))


def test_an_output_no_loss_can_take_a_gradient_through_is_one_line_before_launch(gpupar, tmp_path, monkeypatch):
    from gpupar.errors import UsageError
    from gpupar.models import check_shapes

    (tmp_path / "outs.py").write_text("import torch\n\n\n"
                                      "class IntOut(torch.nn.Linear):\n"
                                      "    def forward(self, x):\n"
                                      "        return (super().forward(x) > 0).long()\n\n\n"
                                      "def int_output():\n"
                                      "    return IntOut(10, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = torch.zeros(4, 10), torch.zeros(4, 1)
    for how, needles in ((lambda y: (y > 0).long(), ("dtype torch.int64", "float32", "an argmax")),
                         (lambda y: y > 0, ("dtype torch.bool",)),
                         (lambda y: torch.complex(y, y), ("dtype torch.complex64", "real-valued")),
                         (lambda y: y.detach(), ("does not require grad", ".detach()")),
                         (lambda y: {"logits": y.argmax(-1, keepdim=True)}, ("dtype torch.int64",)),
                         (lambda y: {"loss": y.sum().detach(), "logits": y}, ("the model's own loss", "require grad"))):
        with pytest.raises(UsageError) as info:
            check_shapes(_Output(how), x, y, "regression")
        assert all(n in str(info.value) for n in needles), (needles, str(info.value))
    with torch.no_grad():  # a caller's no_grad does not hide a good model's gradient
        check_shapes(_Output(), x, y, "regression")
    check_shapes(_Output(lambda y: y.half()), x, y, "regression")  # a half-precision output carries one
    # The adversarial example, through the CLI: one line, exit 2, no run directory.
    code, out, err = gpupar(*TRAIN, "--model", "outs:int_output", "--run-dir", tmp_path / "r")
    one_line_error((code, out, err), "model output has dtype torch.int64")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name, content, needles", [
    ("trainer.json", [1, 2], ("trainer.json: got list", '"position"')),
    ("trainer.json", {"format": 1, "steps_per_epoch": 1}, ("trainer.json: got position None",)),
    ("trainer.json", "negative", ("trainer.json: position.step is -1", "counts >= 0")),
    ("rng/rank-0.json", {}, ("rank-0.json: got []", '"torch"')),
])
def test_corrupt_checkpoint_json_names_the_file(gpupar, run, tmp_path, name, content, needles):
    ckpt = tmp_path / "checkpoints" / "step-2"
    shutil.copytree(run / "checkpoints" / "step-2", ckpt)
    if content == "negative":
        content = json.loads((ckpt / name).read_text())
        content["position"]["step"] = -1
    (ckpt / name).write_text(json.dumps(content))
    from gpupar.safe_dcp import seal

    seal(ckpt)  # whoever can rewrite a file can rewrite its hash: the content is checked on its own
    code, out, err = gpupar(*TRAIN, "--checkpoint-every", 2, "--resume", ckpt, "--run-dir", tmp_path / "r")
    one_line_error((code, out, err), f"corrupt checkpoint file {ckpt / name}", *needles)


# --------------------------------------------------------------------------- output paths

def test_predict_batch_size_and_out_directory(gpupar, run, tmp_path):
    data = tmp_path / "x.csv"
    data.write_text("a,b,c,d,e,f,g,h,i,j\n" + ",".join(["0.5"] * 10) + "\n")
    old = tmp_path / "old.csv"
    old.write_text("precious\n")
    for size in (0, -3):
        one_line_error(gpupar("predict", "--weights", run / "model.safetensors", "--data", data, "--out", old,
                              "--batch-size", size), f"--batch-size {size} must be a positive integer")
        assert old.read_text() == "precious\n"
    one_line_error(gpupar("predict", "--weights", run / "model.safetensors", "--data", data, "--out", tmp_path),
                   f"--out '{tmp_path}' is a directory")
    assert gpupar("predict", "--weights", run / "model.safetensors", "--data", data, "--out", old)[0] == 0
    assert old.read_text().splitlines()[0] == "prediction" and len(old.read_text().splitlines()) == 2
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_predict_csv_of_the_wrong_width_blames_the_data(gpupar, run, tmp_path):
    (tmp_path / "x.csv").write_text("a,b,c\n1,2,3\n")
    one_line_error(gpupar("predict", "--weights", run / "model.safetensors", "--data", tmp_path / "x.csv",
                           "--out", tmp_path / "p.csv"), f"--data {tmp_path / 'x.csv'}: rows have 3 feature columns",
                   "trained on 10")
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_a_deep_mlp_finds_its_first_and_last_layer(gpupar, tmp_path):
    """safetensors sorts names as text ("10.weight" < "2.weight"): widths come from layer order."""
    run_dir = tmp_path / "mlp"
    assert gpupar(*TRAIN, "--model", "mlp", "--layers", 7, "--hidden", 8, "--run-dir", run_dir)[0] == 0
    (tmp_path / "x.csv").write_text("a,b,c,d,e,f,g,h,i,j\n" + ",".join(["0.5"] * 10) + "\n")
    code, out, err = gpupar("predict", "--weights", run_dir / "model.safetensors", "--data", tmp_path / "x.csv",
                            "--out", tmp_path / "p.csv")
    assert code == 0, err
    (tmp_path / "y.csv").write_text("a,b\n1,2\n")
    one_line_error(gpupar("predict", "--weights", run_dir / "model.safetensors", "--data", tmp_path / "y.csv",
                          "--out", tmp_path / "p.csv"), "rows have 2 feature columns", "trained on 10")


def test_export_and_export_best_refuse_a_directory_or_another_suffix(gpupar, run, tmp_path):
    ckpt = run / "checkpoints" / "step-2"
    target = tmp_path / "dir"
    target.mkdir()
    one_line_error(gpupar("export", "--checkpoint", ckpt, "--out", target), f"--out '{target}' is a directory",
                   ".safetensors")
    one_line_error(gpupar("export", "--checkpoint", ckpt, "--out", tmp_path / "w.pt"), "ending in .safetensors")
    one_line_error(gpupar("sweep", "--epochs", 1, "--run-dir", tmp_path / "s", "--export-best", target),
                   f"--export-best '{target}' is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"] and not list(target.iterdir())
    assert gpupar("export", "--checkpoint", ckpt, "--out", target / "w.safetensors")[0] == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.toml", "w.safetensors"]


def test_save_weights_leaves_no_temp_file_and_follows_the_umask(tmp_path):
    from gpupar.errors import UsageError

    with pytest.raises(UsageError, match="is a directory"):
        save_weights({"w": torch.zeros(2)}, tmp_path)
    assert not list(tmp_path.parent.glob(tmp_path.name + "*.tmp"))
    old = os.umask(0o022)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
        os.umask(0o077)
        save_weights({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "b.safetensors").stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# --------------------------------------------------------------------------- listings

def test_runs_piped_into_head_exits_quietly(tmp_path):
    root = tmp_path / "runs"
    summary = json.dumps({"model": "simple-nn", "strategy": "single", "world_size": 1, "final_loss": 0.1,
                          "wall_time_s": 1.0, "finished": "2026-01-01T00:00:00"})
    for i in range(1500):  # more than a pipe buffer, so the write after head exits fails
        (root / f"run-{i:04d}").mkdir(parents=True)
        (root / f"run-{i:04d}" / "summary.json").write_text(summary)
    proc = subprocess.run(f"{sys.executable} -m gpupar runs --run-root {root} | head -1", shell=True,
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.stdout.startswith("run ") and proc.stderr == "", proc.stderr


def test_one_damaged_run_does_not_break_the_listing(gpupar, run, tmp_path):
    root = tmp_path / "runs"
    for name in ("good", "binary", "list"):
        shutil.copytree(run, root / name, ignore=shutil.ignore_patterns("checkpoints"))
    (root / "binary" / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    (root / "list" / "summary.json").write_text("[1, 2]")
    code, out, err = gpupar("runs", "--run-root", root)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "finished" in rows["good"]
    assert "unreadable: summary.json" in rows["binary"] and "unreadable: summary.json holds a list" in rows["list"]


def test_report_skips_a_truncated_metrics_line(gpupar, run, tmp_path):
    pytest.importorskip("matplotlib")
    damaged = tmp_path / "R"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("checkpoints"))
    with (damaged / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "lo')
    code, out, err = gpupar("report", damaged)
    assert code == 0, err
    assert "skipped 1 unreadable line(s)" in err and (damaged / "loss.png").is_file()


def test_runs_lists_a_finished_sweep_with_its_best_loss(gpupar, tmp_path):
    root = tmp_path / "runs"
    assert gpupar("sweep", "--seeds", "0-1", "--epochs", 2, "--run-dir", root / "sw")[0] == 0
    best = json.loads((root / "sw" / "best.json").read_text())
    code, out, err = gpupar("runs", "--run-root", root)
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith("sw ")  # best/ is part of the sweep, not a run of its own
    assert "sweep of 2 models" in rows[0] and f"{best['val_loss']:.4f}" in rows[0] and "no summary" not in out


# --------------------------------------------------------------------------- messages

class Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_names_the_global_and_never_advises_weights_only_false(gpupar, run, tmp_path):
    canary = tmp_path / "canary"
    torch.save({"X": Canary(canary), "y": torch.zeros(2)}, tmp_path / "data.pt")
    torch.save({"fc1.weight": Canary(canary)}, tmp_path / "w.pt")
    for flags in (("train", "--epochs", 1, "--data", tmp_path / "data.pt"),
                  ("predict", "--weights", tmp_path / "w.pt", "--data", tmp_path / "data.pt",
                   "--out", tmp_path / "p.csv")):
        code, out, err = gpupar(*flags)
        one_line_error((code, out, err), "posix.system")
        assert "weights_only=False" not in err and "will likely succeed" not in err.lower()
        assert "`weights_only` set to `False`" not in err
    assert not canary.exists()


def test_help_does_not_list_the_internal_bench_worker(gpupar, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench-worker" not in capsys.readouterr().out
    code, out, err = gpupar("no-such-command")
    one_line_error((code, out, err), "invalid choice: 'no-such-command'", "'train'")
    assert "bench-worker" not in err
