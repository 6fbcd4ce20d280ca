"""The kit of tests/adversarial.py: the case registry, the runner of gpupar, the judge.

Each case (in the adversarial_*.py files) is a function of a ``Ctx`` (its own directory, a runner
of ``python -m gpupar``) that returns (outcome, detail). ``judge`` turns a finished command into
an outcome from what the case expects; the case adds what only it can see (a file changed, a result wrong).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HELD, LOST, TRACEBACK, HANG, SILENT, UNCLEAR = "held", "data lost", "traceback", "hang", "silent wrong", "unclear"
SKIPPED = "skipped"
OUTCOMES = (HELD, LOST, TRACEBACK, HANG, SILENT, UNCLEAR, SKIPPED, "error")
TRAIN = ("train", "--samples", 64, "--epochs", 10, "--log-every", 100)
RANKS = ("--strategy", "ddp", "--nproc-per-node", 2)

MODELS = '''
"""User models of the adversarial run (written by tests/adversarial_cases.py)."""
import os
import time
from pathlib import Path

import torch
from torch import nn


def writes_marker():
    """A factory that leaves a trace: predict must not call one a run's config.toml names."""
    (Path(__file__).parent / "factory-called").write_text(str(os.getpid()))
    return nn.Linear(10, 1)


def no_params():
    model = nn.Linear(10, 1)
    model.requires_grad_(False)
    return model


class IntOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)

    def forward(self, x):
        return (self.fc(x) > 0).long()


def int_output():
    return IntOut()


class Stall(nn.Module):
    """Rank 1 stops before its 4th forward pass, so rank 0 waits alone in the next collective."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 4:
            time.sleep(3600)
        return self.fc(x)


def stall_rank1():
    return Stall()


def per_rank_init():
    """Each rank draws other initial values (a factory that seeds by rank)."""
    torch.manual_seed(int(os.environ.get("RANK", "0")))
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))


class Kill9(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 4:
            os.kill(os.getpid(), 9)
        return self.fc(x)


def kill9_rank1():
    return Kill9()
'''


@dataclass
class Result:
    code: int | None
    out: str
    err: str
    hung: bool = False
    seconds: float = 0.0


@dataclass
class Case:
    name: str
    cls: str
    fn: Callable
    fast: bool  # no ranks, no signals: what --fast runs
    smoke: bool  # a few seconds each, one per class where one is: what the pytest test runs


CASES: list[Case] = []


def case(cls: str, fast: bool = True, smoke: bool = False):
    def register(fn):
        CASES.append(Case(fn.__name__, cls, fn, fast, smoke))
        return fn
    return register


@dataclass
class Ctx:
    root: Path
    dir: Path
    last: Result | None = field(default=None)

    # --- the shared files, made once -----------------------------------------------------------

    def prepare(self) -> None:
        (self.root / "adv_models.py").write_text(MODELS)
        r = self.run(*TRAIN, "--checkpoint-every", 5, "--run-dir", self.root / "base", timeout=300)
        if r.code != 0:
            raise SystemExit(f"the base run failed: {r.err}")
        csv(self.root / "x.csv")

    @staticmethod
    def cleanup(root: Path) -> None:
        for mount in sorted(root.rglob("*"), reverse=True):
            if mount.is_dir() and os.path.ismount(mount):
                subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    def base(self, name: str = "R") -> Path:
        """A copy of the base run (10 steps, checkpoints at 5 and 10) in this case's directory."""
        shutil.copytree(self.root / "base", self.dir / name, symlinks=True)
        return self.dir / name

    # --- running gpupar --------------------------------------------------------------------------

    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), env.get("PYTHONPATH", "")])
        env.update(extra or {})
        return env

    def popen(self, *args, env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "gpupar", *map(str, args)], cwd=self.dir, env=self.env(env),
                                text=True, start_new_session=True, **kwargs)

    def run(self, *args, timeout: float = 120, env: dict | None = None, preexec=None) -> Result:
        start = time.monotonic()
        proc = self.popen(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
        try:
            out, err = proc.communicate(timeout=timeout)
            result = Result(proc.returncode, out, err, seconds=time.monotonic() - start)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            result = Result(None, out, err, hung=True, seconds=timeout)
        self.last = result
        return result


# --- judging -----------------------------------------------------------------------------------

def lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def judge(r: Result, expect=(2,), needles=(), lost: str | None = None, wrong: str | None = None,
          max_lines: int | None = 1, left: Path | None = None) -> tuple[str, str]:
    """The outcome of a finished command, worst first: a hang, lost data, a traceback, a
    wrong result (or exit 0 where a refusal was expected), then the exit code, the message,
    and (``left``: the run directory of a run that should be rejected) what it left behind."""
    if r.hung:
        return HANG, f"no answer in {r.seconds:.0f} s"
    if lost:
        return LOST, lost
    if "Traceback (most recent call last)" in r.err:
        return TRACEBACK, lines(r.err)[-1][:200]
    if wrong:
        return SILENT, wrong
    if r.code == 0 and 0 not in expect:
        return SILENT, "exit 0: accepted what it should refuse"
    if r.code not in expect:
        return UNCLEAR, f"exit {r.code}, expected {expect}"
    if r.code != 0 and max_lines is not None and len(lines(r.err)) > max_lines:
        return UNCLEAR, f"{len(lines(r.err))} lines on stderr"
    missing = [n for n in needles if n.lower() not in (r.err + r.out).lower()]
    if missing:
        return UNCLEAR, f"the message does not name {missing}"
    if left is not None and r.code != 0 and leftovers(left):
        return UNCLEAR, leftovers(left)
    return HELD, f"exit {r.code} in {r.seconds:.1f} s"


def snapshot(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path`` by content (the lock holds only its last holder's pid)."""
    if path.is_file() or path.is_symlink():
        return {"": path.read_bytes()} if path.is_file() else {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".gpupar.lock"}


def changed(before: dict, path: Path, what: str) -> str | None:
    now = snapshot(path)
    if now == before:
        return None
    gone = sorted(set(before) - set(now))
    diff = sorted(k for k in before if k in now and now[k] != before[k])
    return f"{what}: {'gone ' + str(gone[:3]) if gone else ''}{' changed ' + str(diff[:3]) if diff else ''}".strip()


def leftovers(run: Path) -> str | None:
    """A rejected run must leave nothing behind: no directory, or an empty one."""
    if run.is_dir() and any(run.iterdir()):
        return f"a rejected run left {sorted(p.name for p in run.iterdir())}"
    return None


def csv(path: Path, header: str = ",".join(f"f{i}" for i in range(10)), rows: int = 20) -> Path:
    import numpy as np

    cols = len(header.split(","))
    data = np.random.default_rng(0).normal(size=(rows, cols))
    with path.open("w", newline="") as fh:
        fh.write(header + "\n")
        for row in data:
            fh.write(",".join(f"{v:.6f}" for v in row) + "\n")
    return path


class Evil:
    """Unpickling this runs ``touch MARKER``: any loader that runs code is caught."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reseal(checkpoint: Path) -> None:
    """Recompute the checkpoint's COMPLETE marker, as anyone who edits a checkpoint can: the
    hashes guard against corruption, not against an author. Files that are not regular (a
    FIFO) are left out of it; an older gpupar without seals keeps its marker."""
    import hashlib
    import json

    try:
        from gpupar.safe_dcp import SEAL_FORMAT
    except ImportError:
        return
    hashes = {str(p.relative_to(checkpoint)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(checkpoint.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != "COMPLETE"
              and stat.S_ISREG(p.stat().st_mode)}
    (checkpoint / "COMPLETE").write_text(json.dumps({"format": SEAL_FORMAT, "sha256": hashes}, indent=1) + "\n")


def point_shards(checkpoint: Path, target: str) -> None:
    """Rewrite .metadata so that every shard record of __0_0.distcp names ``target``."""
    import dataclasses

    meta = pickle.loads((checkpoint / ".metadata").read_bytes())  # our own file: trusted here
    for key, info in list(meta.storage_data.items()):
        meta.storage_data[key] = dataclasses.replace(info, relative_path=target)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(meta))
    reseal(checkpoint)


def reads_back(ctx: Ctx, r: Result, run: Path) -> tuple[str, str]:
    """A run that should train and write a config.toml that gpupar itself reads back."""
    if r.code != 0:
        return judge(r, left=run)
    back = ctx.run("train", "--config", run / "config.toml", "--print-config")
    if back.code != 0:
        return UNCLEAR, f"gpupar cannot read back its own config.toml: {lines(back.err)[-1:]}"
    return HELD, "written and read back"
