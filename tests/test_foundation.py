"""The Foundation: the classic example, devices, data formats, config layering, bad input, the API."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import gpupar
from gpupar.config import Config
from gpupar.config_file import load_toml, to_toml
from gpupar.data import synthetic_regression
from gpupar.devices import pick_device
from gpupar.errors import TrainingError, UsageError

from conftest import REPO

EPOCH_LINE = re.compile(r"^Epoch \[(\d+)/100\], Loss: (\d+\.\d{4})$")


def test_default_run_prints_five_lines_and_learns(gpupar, tmp_path):
    code, out, err = gpupar("train", "--run-dir", tmp_path / "r")
    assert code == 0, err
    lines = [line for line in out.splitlines() if EPOCH_LINE.match(line)]
    assert [int(EPOCH_LINE.match(line).group(1)) for line in lines] == [20, 40, 60, 80, 100]
    assert out.splitlines()[0] == "Using device: cpu"
    assert lines == plain_loop_lines()  # each line is that epoch's own loss, as the classic loop prints it
    final = float(EPOCH_LINE.match(lines[-1]).group(2))
    assert final < 0.1
    assert "Final loss:" in out and "samples/s" in out and str(tmp_path / "r") in out
    # The run directory holds the config, one metrics record per logged epoch and the weights.
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [20, 40, 60, 80, 100]
    assert set(records[0]) >= {"step", "epoch", "loss", "loss_since_log", "lr", "samples_per_s"}
    assert records[0]["loss_since_log"] > 5 * records[0]["loss"]  # epochs 1-20's mean, from a loss near 40
    assert records[-1]["loss"] == pytest.approx(final, abs=5e-5)
    weights = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert weights["fc1.weight"].shape == (50, 10) and weights["fc2.weight"].shape == (1, 50)
    expected = Config()
    expected.train.run_dir = str(tmp_path / "r")
    assert load_toml(tmp_path / "r" / "config.toml") == expected


def plain_loop_lines() -> list[str]:
    """The classic example's plain loop on gpupar's data and seed (42 for both)."""
    X, y = synthetic_regression(1000, seed=42)
    torch.manual_seed(42)
    model = gpupar.SimpleNN()
    optimizer, criterion, lines = torch.optim.Adam(model.parameters(), lr=0.01), nn.MSELoss(), []
    for epoch in range(100):
        loss = criterion(model(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 20 == 0:
            lines.append(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")
    return lines


def test_same_seed_is_bitwise_identical_and_other_seed_differs(gpupar, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert gpupar("train", "--seed", seed, "--epochs", 20, "--run-dir", tmp_path / name)[0] == 0
    losses = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in "abc"}
    assert losses["a"] == losses["b"] and losses["a"] != losses["c"]
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_device_selection():
    assert pick_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else
                                   torch.device("mps") if torch.backends.mps.is_available() else
                                   torch.device("cpu"))
    assert pick_device("CPU") == torch.device("cpu")
    with pytest.raises(UsageError, match="'tpu' is not one of: auto, cpu, cuda, cuda:N or mps"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            pick_device("cuda:1")


def test_info_lists_versions_backends_and_cores(gpupar):
    code, out, _ = gpupar("info")
    assert code == 0
    assert f"torch: {torch.__version__}" in out
    assert re.search(r"cpu: \d+ cores", out) and "distributed backends:" in out and "gloo" in out


def _write_csv(path, rows, header="a,b,c,target"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


@pytest.fixture
def regression_arrays():
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(64, 3, generator=gen)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]])
    return X, y


@pytest.mark.parametrize("fmt", ["csv", "npz", "pt"])
def test_each_data_format_trains_and_input_width_follows_data(gpupar, tmp_path, regression_arrays, fmt):
    X, y = regression_arrays
    path = tmp_path / f"data.{fmt}"
    extra = []
    if fmt == "csv":
        _write_csv(path, torch.cat([X, y], 1).tolist())
        extra = ["--target", "target"]
    elif fmt == "npz":
        np.savez(path, X=X.numpy(), y=y.numpy())
    else:
        torch.save({"X": X, "y": y}, path)
    code, out, err = gpupar("train", "--data", path, *extra, "--epochs", 60, "--log-every", 30,
                            "--model", "mlp", "--hidden", 16, "--layers", 3, "--run-dir", tmp_path / "r")
    assert code == 0, err
    losses = [float(m.group(1)) for m in re.finditer(r"Loss: (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert load_file(str(tmp_path / "r/model.safetensors"))["0.weight"].shape == (16, 3)


def test_classification_task_uses_cross_entropy(gpupar, tmp_path):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=gen)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()  # three classes
    torch.save({"X": X, "y": y}, tmp_path / "c.pt")
    code, out, err = gpupar("train", "--data", tmp_path / "c.pt", "--task", "classification", "--epochs", 40,
                            "--run-dir", tmp_path / "r")
    assert code == 0, err
    assert load_file(str(tmp_path / "r/model.safetensors"))["fc2.weight"].shape == (3, 50)


def test_config_round_trip_and_layering(gpupar, tmp_path):
    code, out, _ = gpupar("train", "--print-config", "--lr", "0.003", "--batch-size", "100", "--shuffle",
                          "--clip-grad-norm", "1.5", "--model", "mlp")
    assert code == 0
    (tmp_path / "c.toml").write_text(out)
    code, again, _ = gpupar("train", "--print-config", "--config", tmp_path / "c.toml")
    assert code == 0 and again == out
    cfg = load_toml(tmp_path / "c.toml")
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.data.shuffle, cfg.model.name) == (0.003, 100, True, "mlp")
    # CLI flags sit above the TOML file.
    code, layered, _ = gpupar("train", "--print-config", "--config", tmp_path / "c.toml", "--lr", "0.5")
    assert "lr = 0.5" in layered and "batch_size = 100" in layered
    assert to_toml(Config()) != out


def _bad_inputs(tmp_path):
    nonnumeric = _write_csv(tmp_path / "text.csv", [[1, 2, "x", 3], [1, 2, 3, 4]])
    with_nan = _write_csv(tmp_path / "nan.csv", [[1, 2, 3, 4], [1, "nan", 3, 4]])
    good = _write_csv(tmp_path / "good.csv", [[1, 2, 3, 4], [1, 2, 3, 4]])
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train]\nepochs = 'ten'\n")
    return [
        (["--epochs", "-1"], "--epochs -1 must be a positive integer"),
        (["--lr", "abc"], "--lr: invalid value 'abc'; expected a number"),
        (["--model", "resnet"], "--model 'resnet' is not one of: simple-nn, mlp"),
        (["--model", "nosuch.module:fn"], "cannot import module 'nosuch.module'"),
        (["--model", "user_models:not_a_module"], "returned int, not an nn.Module"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
        (["--data", "missing.csv"], "--data missing.csv: file not found"),
        (["--data", nonnumeric, "--target", "target"], "column 'c' data row 1 is not numeric ('x')"),
        (["--data", good], "a CSV needs --target COLUMN; columns are: a, b, c, target"),
        (["--data", good, "--target", "price"], "--target 'price' is not a column"),
        (["--data", with_nan, "--target", "target"], "X holds NaN or Inf (first at data row 2)"),
        (["--model", "user_models:wide_input"], "model does not accept input of shape [10]"),
        (["--precision", "fp8"], "--precision 'fp8' is not one of: fp32, bf16, fp16"),
        (["--batch-size", "300", "--grad-accum", "7"], "--batch-size 300 must be divisible by --grad-accum"),
        (["--config", bad_toml], "train.epochs = 'ten' should be of type int"),
        (["--nosuch-flag"], "unrecognized arguments: --nosuch-flag"),
    ]


def test_every_bad_input_is_one_line_exit_2(gpupar, tmp_path):
    for args, message in _bad_inputs(tmp_path):
        code, out, err = gpupar("train", *args, "--run-dir", tmp_path / "never")
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "never" / "model.safetensors").exists()


def test_bad_input_from_a_real_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gpupar", "train", "--lr", "abc"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpupar: error: gpupar train: argument --lr: invalid value 'abc'; " \
                                  "expected a number (see --help)"


def test_import_gpupar_is_light_and_its_api_names_stay_functions():
    """`import gpupar` (and so every `gpupar` command before it needs them) loads neither torch's
    distributed tensors nor DCP: the API's names load on first use. gpupar.verify stays the
    function once the verify harness is loaded (it was replaced by the subpackage of that name,
    so a second gpupar.verify(cfg) in one process called a module)."""
    code = ("import sys, gpupar; print(sorted(m for m in ('torch.distributed.tensor', 'torch.distributed.checkpoint',"
            " 'gpupar.ownloop', 'gpupar.api') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True).stdout.strip() == "[]"
    import gpupar.api
    import gpupar.parity.harness  # noqa: F401

    assert gpupar.verify is gpupar.api.verify and gpupar.train is gpupar.api.train
    assert gpupar.setup.__module__ == "gpupar.ownloop" and "setup" in dir(gpupar)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gpupar.nope


def test_nan_loss_stops_at_named_step_and_keeps_last_good_weights(gpupar, tmp_path):
    run = tmp_path / "r"
    assert gpupar("train", "--epochs", 5, "--run-dir", run)[0] == 0
    good = (run / "model.safetensors").read_bytes()
    code, _, err = gpupar("train", "--model", "user_models:goes_nan", "--run-dir", run)
    assert code == 2 and "holds a finished run" in err  # another run never writes over it
    code, _, err = gpupar("train", "--model", "user_models:goes_nan", "--run-dir", tmp_path / "nan")
    assert code == 1
    assert "loss became non-finite (nan) at step 6 (epoch 6)" in err  # 1 shape-check call + 5 steps
    assert not (tmp_path / "nan/model.safetensors").exists()
    assert (run / "model.safetensors").read_bytes() == good


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x)


def _api_config(**train):
    cfg = Config()
    for key, value in train.items():
        for section in ("train", "optim", "data"):
            if hasattr(getattr(cfg, section), key):
                setattr(getattr(cfg, section), key, value)
    cfg.train.progress = False
    return cfg


def test_python_api_trains_a_user_module_from_tensors_or_a_dataset():
    X, y = synthetic_regression(seed=1)
    torch.manual_seed(0)
    a = gpupar.train(UserModel(), (X, y), config=_api_config(epochs=50, batch_size=100, shuffle=True,
                                                              val_fraction=0.2))
    torch.manual_seed(0)
    b = gpupar.train(UserModel(), TensorDataset(X, y), config=_api_config(epochs=50, batch_size=100,
                                                                          shuffle=True, val_fraction=0.2))
    assert isinstance(a.model, UserModel)
    assert a.history.records[-1]["val_loss"] < 0.2 and a.history.final_loss < a.history.records[0]["loss"]
    # A Dataset and the same tensors give the same batches, so the same history.
    assert [r["loss"] for r in a.history.records] == [r["loss"] for r in b.history.records]


def test_grad_accum_equals_the_full_batch():
    X, y = synthetic_regression(samples=240, seed=2)
    results = []
    for accum in (1, 4):
        torch.manual_seed(0)
        results.append(gpupar.train(UserModel(), (X, y), config=_api_config(epochs=10, batch_size=120,
                                                                              grad_accum=accum)))
    # Four micro-batch means / 4 == one batch mean, up to float32 summation order.
    for p, q in zip(results[0].model.parameters(), results[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_schedule_warmup_clipping_max_steps_and_bf16():
    X, y = synthetic_regression(samples=200)
    torch.manual_seed(0)
    cfg = _api_config(epochs=50, batch_size=50, max_steps=30, warmup_steps=10, lr_schedule="linear",
                      clip_grad_norm=0.5, precision="bf16")
    cfg.train.log_every = 1
    result = gpupar.train(UserModel(), (X, y), config=cfg)
    steps = [r["step"] for r in result.history.records]
    assert steps[-1] == 30 and result.history.records[-1]["epoch"] == 8  # 4 steps/epoch, stopped mid-epoch 8
    lrs = [r["lr"] for r in result.history.records]
    # Warm-up (step+1)/10 to step 10, then linear decay to 0 at step 30.
    assert lrs[:3] == pytest.approx([0.005, 0.009, 0.009]) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    cosine = _api_config(epochs=5, lr_schedule="cosine")
    torch.manual_seed(0)
    assert gpupar.train(UserModel(), (X, y), config=cosine).history.records[-1]["lr"] < 0.01


def test_nan_in_api_raises_training_error():
    from user_models import GoesNaN

    X, y = synthetic_regression(samples=50)
    with pytest.raises(TrainingError, match=r"at step 7 \(epoch 7\)"):
        gpupar.train(GoesNaN(), (X, y), config=_api_config(epochs=20))


@pytest.mark.parametrize("section,key,value", [("train", "run_dir", "runs/mine"), ("checkpoint", "checkpoint_every", 5),
                                               ("checkpoint", "resume", "auto"), ("track", "track", "tensorboard")])
def test_the_api_refuses_what_it_would_ignore(section, key, value, tmp_path, monkeypatch):
    """gpupar.train writes nothing: a run directory, checkpoints, a resume or a tracker asked
    for in the config were ignored without a word. One error naming the field, before training."""
    monkeypatch.chdir(tmp_path)
    cfg = _api_config(epochs=2)
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(UsageError, match=rf"^config\.{section}\.{key} is {value!r}, but gpupar.train writes no run"):
        gpupar.train(nn.Linear(10, 1), synthetic_regression(samples=50), config=cfg)
    assert not list(tmp_path.iterdir())
