"""Adversarial cases on saves: a signal at many points of a checkpoint save, and a disk
that fills (or a file-size limit that trips) mid-save. Each must end 130 / 143 or in one line,
with every committed checkpoint whole and the one left resumable."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

from adversarial_kit import HELD, LOST, SKIPPED, UNCLEAR, Result, case, judge, lines

# --- signals and full disks mid-save ---------------------------------------------------------

BIG = ("--model", "mlp", "--hidden", 768, "--layers", 4, "--samples", 64, "--log-every", 10**6)


def verify_checkpoints(run: Path) -> str | None:
    """None when every committed checkpoint is whole (sealed files match, shards cover their
    slices) and at least one is left; else what is wrong."""
    root = run / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp")) if root.is_dir() else []
    if not done:
        return "no committed checkpoint is left"
    for step in done:
        if not (step / "COMPLETE").is_file():
            return f"{step.name} has no COMPLETE marker but is in place"
        try:
            from gpupar.safe_dcp import check_seal

            check_seal(step, step.name)
        except ImportError:
            pass
        except Exception as exc:
            return f"{step.name} is corrupt: {exc}"
        meta = pickle.loads((step / ".metadata").read_bytes())
        for info in meta.storage_data.values():
            shard = step / info.relative_path
            if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
                return f"{step.name}: {info.relative_path} is short or missing"
    return None


def _wait_for(path_glob, run: Path, proc, bound: float = 180) -> bool:
    deadline = time.monotonic() + bound
    while not list(run.glob(path_glob)):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _signal_mid_save(ctx, sig: int, delay: float):
    run = ctx.dir / "R"
    proc = ctx.popen("train", *BIG, "--epochs", 10**6, "--checkpoint-every", 1, "--keep-last", 2, "--run-dir", run,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = _wait_for("checkpoints/step-2/COMPLETE", run, proc)
    time.sleep(delay)  # from the commit of step 2 into the save of step 3 (or later ones)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
        r = Result(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        r = Result(None, *proc.communicate(), hung=True, seconds=60)
    ctx.last = r
    if not started:
        return "error", "the run did not reach its second checkpoint"
    broken = None if r.hung else verify_checkpoints(run)
    outcome = judge(r, expect=(128 + sig,), lost=broken)
    if outcome[0] != HELD:
        return outcome
    resumed = ctx.run("train", *BIG, "--epochs", 10**6, "--max-steps", 1, "--resume", "auto", "--run-dir", run)
    if resumed.code not in (0, 2) or "Resumed from" not in resumed.out and resumed.code == 0:
        return LOST, f"the checkpoint left does not resume: {lines(resumed.err)[-1:] or resumed.out[-200:]}"
    return outcome


for _sig, _delays in ((signal.SIGTERM, (0.0, 0.02, 0.05, 0.1, 0.2, 0.35)), (signal.SIGINT, (0.0, 0.05, 0.15))):
    for _delay in _delays:
        def _case(ctx, sig=_sig, delay=_delay):
            return _signal_mid_save(ctx, sig, delay)

        _case.__name__ = f"{signal.Signals(_sig).name.lower()}_mid_save_after_{int(_delay * 1000)}ms"
        case("traceback", fast=False)(_case)


def _full_disk_mid_save(ctx, preexec=None, mount: Path | None = None):
    """A checkpoint of this model is 3.2 MiB (a 1.1 MiB shard of weights and two of Adam's
    moments), so a 4 MiB disk takes the first and fills on the second, and a 1 MiB file-size
    limit trips on the first shard."""
    run = (mount or ctx.dir) / "R"
    r = ctx.run("train", "--model", "mlp", "--hidden", 512, "--layers", 3, "--samples", 64, "--epochs", 20,
                "--log-every", 100, "--checkpoint-every", 1, "--keep-last", 2, "--run-dir", run, preexec=preexec)
    stray = [p.name for p in run.rglob("*.tmp")] if run.is_dir() else []
    broken = verify_checkpoints(run) if (run / "checkpoints").is_dir() and r.code != 0 else None
    outcome = judge(r, expect=(1, 2), lost=broken if broken != "no committed checkpoint is left" else None)
    if outcome[0] == HELD and stray:
        return UNCLEAR, f"a half-written file was left in place: {stray[:3]}"
    return outcome


@case("traceback", fast=False)
def disk_full_mid_save(ctx):
    """A tmpfs of 4 MiB: the first checkpoints fit, a later save fills the disk (ENOSPC)."""
    mount = ctx.dir / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        return SKIPPED, "needs root to mount a tmpfs"
    try:
        return _full_disk_mid_save(ctx, mount=mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@case("traceback", fast=False)
def file_size_limit_mid_save(ctx):
    """RLIMIT_FSIZE of 1 MiB: a shard write fails (EFBIG), as a quota would."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    return _full_disk_mid_save(ctx, preexec=limit)
