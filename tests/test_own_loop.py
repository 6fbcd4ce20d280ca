"""gpupar.setup: the classic loop kept as written, at 2 processes, trains the one-process weights."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import torch

from gpupar.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _code(path: Path) -> list[str]:
    """The script without its docstring (the lines a user changes)."""
    text = path.read_text()
    return text.split('"""', 2)[2].splitlines()


def test_own_loop_changes_at_most_6_lines_of_the_classic_loop():
    diff = [d for d in difflib.ndiff(_code(EXAMPLES / "classic_loop.py"), _code(EXAMPLES / "own_loop.py"))
            if d.startswith("+ ")]
    assert 0 < len(diff) <= 6, diff


def _run(argv: list[str], out: Path, env: dict | None = None) -> str:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPAR_VERIFY_DIR": str(out), **(env or {})}
    done = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_own_loop_at_two_ranks_trains_the_one_process_weights(tmp_path):
    """gpupar run (ddp, fsdp) and torchrun against one process; DDP parity tolerance 1e-5."""
    script = str(EXAMPLES / "own_loop.py")
    single = _run([sys.executable, script], tmp_path / "single")
    runs = {"ddp": _run([sys.executable, "-m", "gpupar", "run", "--nproc-per-node", "2", script], tmp_path / "ddp"),
            "fsdp": _run([sys.executable, "-m", "gpupar", "run", "--nproc-per-node", "2", "--strategy", "fsdp",
                          script], tmp_path / "fsdp"),
            "torchrun": _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script],
                             tmp_path / "torchrun")}
    ref = load_weights(tmp_path / "single" / "model.safetensors")
    for name, stdout in runs.items():
        assert stdout.count("Epoch [") == 5, (name, stdout)  # rank 0 prints, once
        got = load_weights(tmp_path / name / "model.safetensors")
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    assert single.splitlines()[-1].startswith("Epoch [100/100]")


def test_gpupar_run_names_the_failing_rank(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, sys\nif os.environ['RANK'] == '1':\n    raise ValueError('planted')\n")
    done = subprocess.run([sys.executable, "-m", "gpupar", "run", "--nproc-per-node", "2", str(bad)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "rank 1 failed" in done.stderr and "planted" in done.stderr
