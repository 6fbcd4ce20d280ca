"""Every verb of ``gpupar.setup`` in a user's own loop (tests/own_verbs.py: a ModuleList model,
AdamW with two parameter groups, accumulation under ``gp.no_sync``, ``gp.forward_backward``,
``gp.clip_grad_norm_``, ``gp.all_reduce``, ``gp.save`` / ``gp.load``) at 2 processes under
ddp, fsdp, tp and pp, against the same script on one process.

Four launches (one per layout), and three one-process runs in this process (no spawn)."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "own_verbs.py"


def _launch(strategy: str, out: Path, *args) -> str:
    """`gpupar run --nproc-per-node 2 --strategy S tests/own_verbs.py OUT ...`"""
    argv = [sys.executable, "-m", "gpupar", "run", "--nproc-per-node", "2", "--strategy", strategy, str(SCRIPT),
            str(out), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"{strategy}: {done.stdout[-1000:]}{done.stderr[-3000:]}"
    return done.stdout


def _one_process(out: Path, *args) -> None:
    """The script on one process, here: `gpupar run tests/own_verbs.py OUT ...` (no ranks)."""
    from gpupar.cli import main

    assert main(["run", str(SCRIPT), str(out), *map(str, args)]) == 0


def _checkpoint(out: Path) -> dict:
    """What gp.save wrote, read by DCP's own converter (not by gp.load)."""
    dcp_to_torch_save(out / "ckpt", out / "ckpt.pt")
    return torch.load(out / "ckpt.pt", weights_only=False)


def _record(out: Path) -> dict:
    return json.loads((out / "record.json").read_text())


def _assert_parity(got: dict, ref: dict, name: str) -> None:
    """DDP parity tolerance: splitting the batch over 2 ranks (and over 2 micro-batches, TP's
    partial sums, a pipeline's 4 micro-batches) changes the summation order of each gradient,
    ~1e-7 relative per step; over these 4-8 AdamW steps the weights differ by < 3e-7 (measured
    1.2e-7 absolute). A verb that breaks is far beyond it: the head's own lr (3e-3, not 1e-2)
    lost moves the head by ~1e-2, a local clip norm is 1/sqrt(2) of the global one."""
    assert got["step"] == ref["step"], name
    for part in ("model", "optimizer"):
        state = (got[part], ref[part]) if part == "model" else (got[part]["state"], ref[part]["state"])
        assert state[0].keys() == state[1].keys(), f"{name} {part}"
        torch.testing.assert_close(state[0], state[1], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {part}: {m}")
    # the two groups, their hyperparameters and parameter names, as one process saves them
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"], name


def test_every_verb_of_gpupar_setup_at_2_processes_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `gpupar run` here sets the script's argv
    ref, ref2 = tmp_path / "ref", tmp_path / "ref2"
    _one_process(ref)                  # 1 epoch (4 steps), 2 micro-batches each
    _one_process(ref2, "--epochs", 2)  # 2 epochs straight: what a resumed run must reach
    out = _launch("ddp", tmp_path / "ddp")
    assert out.count("epoch 1: loss") == 1, out  # gp.print: rank 0 only
    _launch("fsdp", tmp_path / "fsdp")
    # fsdp's checkpoint resumed under tensor parallel and under a pipeline (gp.forward_backward
    # runs its 1F1B schedule; no_sync has nothing to skip): model and AdamW state resharded.
    for layout in ("tp", "pp"):
        _launch(layout, tmp_path / layout, "--resume", tmp_path / "fsdp" / "ckpt", "--epochs", 2)
    # fsdp's checkpoint on one process: gp.load, no step, gp.save again.
    _one_process(tmp_path / "back", "--resume", tmp_path / "fsdp" / "ckpt")

    want, want2 = _checkpoint(ref), _checkpoint(ref2)
    for name, expected in (("ddp", want), ("fsdp", want), ("tp", want2), ("pp", want2)):
        _assert_parity(_checkpoint(tmp_path / name), expected, name)
    saved, back = _checkpoint(tmp_path / "fsdp"), _checkpoint(tmp_path / "back")
    assert back["step"] == saved["step"] == 4
    # gp.load on one process gives exactly what fsdp saved: weights, AdamW's state and groups
    torch.testing.assert_close((back["model"], back["optimizer"]["state"]),
                               (saved["model"], saved["optimizer"]["state"]), rtol=0, atol=0)
    assert back["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]

    one, one2 = _record(ref), _record(ref2)
    for name in ("ddp", "fsdp", "tp", "pp"):
        resumed = name in ("tp", "pp")  # epoch 2 of the 2-epoch run
        rec, expected, steps = _record(tmp_path / name), (one2 if resumed else one), slice(4, 8) if resumed else slice(4)
        # clip_grad_norm_: the whole gradient's norm, as one process computes it (and > 0.5: it clips)
        torch.testing.assert_close(rec["norms"], expected["norms"][steps], rtol=1e-5, atol=0, msg=name)
        assert min(rec["norms"]) > 0.5, rec["norms"]
        # forward_backward's loss and all_reduce's sum are the global batch's, on every layout
        torch.testing.assert_close(rec["losses"], expected["losses"][steps], rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(rec["target_sums"], expected["target_sums"][steps], rtol=1e-6, atol=1e-6, msg=name)
        assert rec["seen"] == 64.0, (name, rec["seen"])  # 4 steps x 16 samples, each counted once
        # gp.setup rebuilt AdamW with both groups' hyperparameters on this layout's parameters
        assert rec["optimizer"] == "AdamW" and rec["groups"] == one["groups"], name
        # the script never destroyed the group; gpupar left it at exit on both ranks (no SIGABRT
        # from gloo's threads torn down at interpreter exit, pytorch/pytorch#190489)
        assert [(tmp_path / name / f"left-{r}").read_text() for r in (0, 1)] == ["True", "True"], name
    kinds = {name: _record(tmp_path / name)["sharded"] for name in ("ddp", "fsdp", "tp", "pp")}
    assert set(kinds["ddp"]) == {"Parameter"} and set(kinds["fsdp"]) == {"DTensor"}, kinds
    assert set(kinds["tp"]) == {"Parameter", "DTensor"}, kinds  # LayerNorms stay whole under TP
    assert 0 < len(kinds["pp"]) < len(kinds["ddp"]), kinds  # rank 0's stage only


def test_what_a_hand_written_loop_cannot_do_is_one_line():
    """No ranks: the checks come before any collective."""
    from gpupar.errors import UsageError
    from gpupar.ownloop import Setup
    from gpupar.parallel.pipeline import Pipeline
    from gpupar.topology import ParallelDims, Topology
    from user_models import ResidualMLP

    def at(**degrees) -> Setup:  # as gpupar.setup() leaves it at 2 ranks, without their process group
        gp = Setup.__new__(Setup)
        gp.topo, gp.recorder = Topology(torch.device("cpu"), world_size=2, dims=ParallelDims(**degrees)), None
        return gp

    gp, pp = at(dp_replicate=2, process="ranks"), at(pp=2, process="ranks")
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    for call, says in ((lambda: gp.no_sync(model), "not the model gp.setup returned"),
                       (lambda: gp.all_reduce(torch.ones(()), "max"), "accepted are 'mean' and 'sum'"),
                       (lambda: gp.setup(model, optimizer), "must come before the optimizer's first step"),
                       (lambda: Pipeline.forward(None, torch.ones(1)), "call gp.forward_backward(model, batch"),
                       (lambda: pp.setup(ResidualMLP()), "gp.setup(model, optimizer, example=inputs) under pp")):
        with pytest.raises(UsageError, match=re.escape(says)) as caught:
            call()
        assert "\n" not in str(caught.value)
