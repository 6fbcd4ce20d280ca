"""gpupar.setup: the classic loop kept as written trains, at 2 processes (gpupar run, torchrun,
a process group the user started), the one-process weights; and `gpupar verify -- python
script.py` passes it under ddp and fsdp and fails each planted bug at the step it shows."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpupar.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
OWN_LOOP = EXAMPLES / "own_loop.py"


def _code(path: Path) -> list[str]:
    """The script without its docstring (the lines a user changes)."""
    text = path.read_text()
    return text.split('"""', 2)[2].splitlines()


def test_own_loop_changes_at_most_6_lines_of_the_classic_loop():
    """Changed lines as difflib counts them: each replaced, added or removed line once (a
    replaced block counts its longer side)."""
    before, after = _code(EXAMPLES / "classic_loop.py"), _code(OWN_LOOP)
    ops = difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes()
    changed = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
    assert 0 < changed <= 6, "\n".join(difflib.unified_diff(before, after, lineterm=""))
    assert any("for inputs, targets in loader:" in line for line in after)  # the loop is still the user's


def _run(argv: list[str], out: Path, env: dict | None = None) -> str:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPAR_VERIFY_DIR": str(out), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    return done.stdout


def _assert_same_weights(run: Path, reference: Path, name: str) -> None:
    """DDP parity tolerance: a 2-way all-reduce changes the summation order of each gradient
    (1e-7 relative per step); over 100 Adam steps the classic model drifts < 1e-6 (measured 4e-7)."""
    ref, got = load_weights(reference / "model.safetensors"), load_weights(run / "model.safetensors")
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def _verify(main, capfd, *argv) -> tuple[int, str, str]:
    code = main(["verify", "--nproc-per-node", "2", *map(str, argv)])
    out, err = capfd.readouterr()  # the ranks write to the file descriptors, not sys.stdout
    return code, out, err


def test_own_loop_verify_passes_and_every_launcher_trains_the_one_process_weights(tmp_path, capfd, monkeypatch):
    """`gpupar verify -- python examples/own_loop.py` under ddp and fsdp (its strategy run is
    `gpupar run`'s path); then torchrun with ddp, and torchrun with fsdp in a process group the
    script started itself (tests/own_pg.py), against verify's one-process reference."""
    from gpupar.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every process here: 2 cores, up to 4 processes
    for strategy in ("ddp", "fsdp"):
        code, out, err = _verify(main, capfd, "--strategy", strategy, "--run-dir", tmp_path / strategy,
                                 "--", "python", OWN_LOOP)
        assert code == 0, out + err
        assert out.splitlines()[-1].startswith(f"PASS: {strategy}(dp=2) matches"), out
        assert out.count("Epoch [") == 5, out  # rank 0 prints, once; the references' output is in their log
        assert "Epoch [100/100]" in (tmp_path / strategy / "reference" / "output.log").read_text()
        _assert_same_weights(tmp_path / strategy / "strategy", tmp_path / "ddp" / "reference", f"gpupar run {strategy}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    out = _run([*torchrun, str(ROOT / "tests" / "left_at_exit.py"), str(OWN_LOOP)], tmp_path / "torchrun-ddp")
    assert out.count("Epoch [") == 5, out
    assert out.count("OK left the process group at exit: True") == 2, out  # the script never destroyed it
    out = _run([*torchrun, str(ROOT / "tests" / "own_pg.py"), str(OWN_LOOP)], tmp_path / "torchrun-fsdp",
               {"GPUPAR_STRATEGY": "fsdp"})
    assert out.count("OK own process group") == 2, out
    for name in ("torchrun-ddp", "torchrun-fsdp"):
        _assert_same_weights(tmp_path / name, tmp_path / "ddp" / "reference", name)


# Each bug is planted in examples/own_loop.py (10 epochs) and is invisible on one process.
BUGS = {
    "the loss divided by the world size by hand": (
        "ddp", "loss = criterion(outputs, targets)", "loss = criterion(outputs, targets) / gp.world_size"),
    "every rank the same data: no setup_dataloader, a per-process batch": (
        "ddp", "loader = gp.setup_dataloader(DataLoader(TensorDataset(X, y), batch_size=1000))",
        "loader = DataLoader(TensorDataset(X, y), batch_size=1000 // gp.world_size)"),
    # DDP broadcasts rank 0's weights, which hides it there; FSDP keeps each rank's own shard.
    "the model seeded per rank": ("fsdp", "model = SimpleNN()", "torch.manual_seed(gp.rank)\nmodel = SimpleNN()"),
}


@pytest.mark.parametrize("bug", BUGS)
def test_verify_of_a_script_fails_a_planted_bug_at_step_1(bug, tmp_path, capfd, monkeypatch):
    from gpupar.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    strategy, old, new = BUGS[bug]
    text = OWN_LOOP.read_text()
    assert old in text and "range(100)" in text
    script = tmp_path / "bugged.py"
    script.write_text(text.replace(old, new).replace("range(100)", "range(10)"))
    code, out, err = _verify(main, capfd, "--strategy", strategy, "--run-dir", tmp_path / "v", "--", "python", script)
    assert code == 1, out + err
    assert out.splitlines()[-1].startswith(f"FAIL: {strategy}(dp=2) differs from the reference at step 1"), out
    assert "no rounding-noise reference needed" in out  # a step-1 loss beyond rounding: no third run
    if "same data" in bug:  # and the step count says why
        assert "took 20 steps under ddp(dp=2) and 10 on one process" in out, out


def test_verify_of_a_script_refuses_what_it_cannot_judge_in_one_line(tmp_path, gpupar_cli):
    plain = tmp_path / "plain.py"
    plain.write_text("print('a loop that never calls gpupar.setup')\n")
    unrecorded = tmp_path / "unrecorded.py"  # the example with loss.backward(): verify sees no loss
    unrecorded.write_text(OWN_LOOP.read_text().replace("gp.backward(loss)", "loss.backward()")
                          .replace("range(100)", "range(1)"))
    for argv, says in (
            (["--strategy", "ddp", "--", "python", plain], "never called gpupar.setup() on one process"),
            (["--strategy", "ddp", "--", "python", unrecorded], "recorded no loss on one process: call gp.backward"),
            (["--strategy", "ddp", "--epochs", "3", "--", "python", plain], "--epochs belong to the script"),
            (["--strategy", "ddp", "--", "python", "-m", "mymodule"], "expected `python SCRIPT.py [args]`"),
            (["--strategy", "ddp", "--", "python", tmp_path / "missing.py"], "no such script"),
            (["--", "python", plain], "pass --strategy ddp (or fsdp)")):
        code, out, err = gpupar_cli("verify", "--nproc-per-node", 2, "--run-dir", tmp_path / "v", "--overwrite",
                                    *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, (argv, err)


def test_gpupar_run_names_the_failing_rank(tmp_path):
    bad = tmp_path / "bad.py"
    # Rank 0 goes on into collectives rank 1 never joins: the failed rank must exit at once (its
    # exit handlers skipped), not wait at gpupar's exit barrier until the 120 s group timeout.
    bad.write_text("import os, torch, torch.distributed as dist, gpupar\ngp = gpupar.setup()\n"
                   "if os.environ['RANK'] == '1':\n    raise ValueError('planted')\n"
                   "while True:\n    dist.all_reduce(torch.ones(1))\n")
    done = subprocess.run([sys.executable, "-m", "gpupar", "run", "--nproc-per-node", "2", str(bad)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "rank 1 failed" in done.stderr and "planted" in done.stderr
