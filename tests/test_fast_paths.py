"""Issue 15: no host sync between log points, fused optimizers, compile flags, the GPU suite."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import gpupar
from gpupar.config import Config
from gpupar.data import synthetic_regression
from gpupar.errors import TrainingError
from gpupar.data import as_samples
from gpupar.training.loop import Hooks, fit
from gpupar.training.recipe import make_loss, make_optimizer
from gpupar.topology import Topology

from conftest import REPO

# Every way a tensor's value reaches the host: each waits for the GPU to finish its queue.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


def _config(**train):
    cfg = Config()
    cfg.train.progress = False
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every = 30, 100, 10  # 2 steps/epoch: log at 20, 40, 60
    for key, value in train.items():
        section = next(s for s in ("train", "optim", "checkpoint") if hasattr(getattr(cfg, s), key))
        setattr(getattr(cfg, section), key, value)
    return cfg


def _reads_per_step(cfg, monkeypatch):
    """Train a BatchNorm/Dropout model on CPU, counting host reads of tensors between steps."""
    from user_models import batchnorm_dropout

    X, y = synthetic_regression(samples=200, seed=3)
    torch.manual_seed(0)
    model = batchnorm_dropout()
    train_set, _ = as_samples((X, y), cfg)
    reads, marks = [], []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    history = fit(model, train_set, cfg, Topology.single(torch.device("cpu")), make_loss(cfg),
                  make_optimizer(model, cfg), hooks=Hooks(log=lambda _: None, on_step=lambda step: marks.append(len(reads))))
    monkeypatch.undo()
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # reads after step k, up to step k + 1's end
    return per_step, history


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_no_host_read_between_log_points(monkeypatch, on_nan):
    cfg = _config(on_nan=on_nan, lr_schedule="cosine", warmup_steps=5, clip_grad_norm=1.0)
    per_step, history = _reads_per_step(cfg, monkeypatch)
    log_steps = {r["step"] for r in history.records}
    assert log_steps == {20, 40, 60}
    # per_step[k - 1] counts the reads from after step k to the end of step k + 1: only a log
    # point (after step k) may read; every other step runs with none.
    busy = {k for k, n in enumerate(per_step, start=1) if n}
    assert busy <= log_steps and busy == {20, 40}, per_step  # the wrapper saw the log points' reads
    assert len(history.step_losses) == 60 and history.records[-1]["loss"] < history.records[0]["loss"]


def test_nan_skip_masks_the_step_on_the_device_and_stop_names_the_first_bad_step():
    from user_models import GoesNaN

    X, y = synthetic_regression(samples=50)
    torch.manual_seed(0)
    model = GoesNaN()  # NaN from its 7th forward (the 7th step) on
    before = None

    def remember(step):
        nonlocal before
        if step == 6:
            before = [p.detach().clone() for p in model.parameters()]

    cfg = _config(epochs=9, batch_size=None, on_nan="skip")
    history = fit(model, as_samples((X, y), cfg)[0], cfg, Topology.single(torch.device("cpu")), make_loss(cfg),
                  make_optimizer(model, cfg), hooks=Hooks(log=lambda _: None, on_step=remember))
    assert history.skipped_steps == [7, 8, 9]
    for p, q in zip(before, model.parameters()):  # fused Adam's found_inf left weights and moments alone
        assert torch.equal(p, q)
    with pytest.raises(TrainingError, match=r"loss became non-finite \(nan\) at step 7 \(epoch 7\)"):
        gpupar.train(GoesNaN(), (X, y), config=_config(epochs=9, batch_size=None, log_every=5))


def test_fused_optimizer_is_the_default_and_the_flag_gives_torch_bits():
    X, y = synthetic_regression(samples=200)

    def run(impl):
        torch.manual_seed(0)
        cfg = _config(epochs=20, batch_size=None, optimizer_impl=impl)
        return gpupar.train(gpupar.SimpleNN(), (X, y), config=cfg).model

    torch.manual_seed(0)
    plain = gpupar.SimpleNN()
    opt = torch.optim.Adam(plain.parameters(), lr=0.01)
    for _ in range(20):
        loss = nn.functional.mse_loss(plain(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    default, fused = run("default"), run("fused")
    for p, q, r in zip(plain.parameters(), default.parameters(), fused.parameters()):
        assert torch.equal(p, q)  # --optimizer-impl default: the plain torch loop's bits
        # The fused kernel orders its float32 arithmetic differently: a few ulp per step.
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)
    assert make_optimizer(fused, Config()).defaults["fused"] is True


def test_cuda_graphs_on_cpu_is_one_line(gpupar):
    code, _, err = gpupar("train", "--device", "cpu", "--cuda-graphs", "--epochs", 1)
    assert code == 2 and err.strip() == ("gpupar: error: --cuda-graphs needs a CUDA device (this run is on cpu); "
                                         "use --compile alone"), err


def test_gpu_suite_runs_tiny_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    parts = json.loads((tmp_path / "suite.json").read_text())["parts"]
    assert set(parts) == {"tests", "gpt_eager", "classic", "plan", "sweep", "gpt_compiled", "ac_diag", "cpu_suite"}
    assert not any("error" in row for row in parts.values()), parts
    assert parts["gpt_eager"]["tokens_per_s"] > 0 and parts["classic"]["gpupar"]["ratio_median"] > 0
    # the plan part predicted every model's rows and ran each (CPU: no allocator to measure)
    plan = parts["plan"]["rows"]
    assert {r["model"] for r in plan} == {"mlp", "gpt"} and all(r["persistent"] == r["pred_persistent"] for r in plan)
    assert "| classic |" in (tmp_path / "suite.md").read_text()
