"""A run directory belongs to one run.

Three rules, checked after every other check has passed and before anything is written:

1. **One run at a time.** The run holds an exclusive ``fcntl.flock`` on ``RUN/.gpupar.lock``
   for its whole life (the launcher holds it for all its ranks); the lock file names the
   holder (pid and command), so a second run on the directory is refused naming it. The
   kernel drops the lock when the holder exits, however it exits: no stale locks.
2. **No run over another.** A directory that holds another run's files, finished or not,
   is refused, unless ``--resume`` continues that run or ``--overwrite`` (explicit) replaces
   it. The earlier run's files (the ones in ``RUN_FILES``, nothing else) are moved aside into
   ``RUN/.replaced-<id>/`` (a rename: no copy) and deleted only once the new run has
   committed its results; a new run that fails or is interrupted leaves them there and says so.
3. **Checkpoints know their run.** Every run has an id, recorded in each checkpoint's
   ``trainer.json``; keep-last prunes only checkpoints with the current run's id. A resumed
   run continues its checkpoint's id. The launcher hands the id to its ranks in
   ``GPUPAR_RUN_ID``.

The results of a run (config.toml, metrics.jsonl, step_losses.json, model.safetensors,
summary.json) are written together at its end through ``files.atomic_write_many``: a run that
fails (a non-finite loss, a full disk, a read-only directory) leaves the earlier files as they
were, byte for byte.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gpupar.errors import UsageError
from gpupar.run.files import open_nofollow

LOCK = ".gpupar.lock"
COMPLETE = "COMPLETE"  # the marker of a committed checkpoint (gpupar.checkpoint writes it)
STEP_DIR = re.compile(r"step-(\d+)")
RUN_ID_ENV = "GPUPAR_RUN_ID"
# What a gpupar run writes into its directory; --overwrite moves these aside and nothing else.
RUN_FILES = ("config.toml", "launch.toml", "metrics.jsonl", "step_losses.json", "model.safetensors",
             "summary.json", "loss.png", "checkpoints", "sweep.jsonl", "best.json", "best")


@dataclass
class RunDir:
    """A claimed run directory: its path, the run's id, and the lock (None in a rank whose
    launcher holds it)."""

    path: Path
    run_id: str
    lock_fd: int | None = None
    earlier: list[str] = field(default_factory=list)  # files of an earlier part (a resumed run)
    replaced: Path | None = None  # where --overwrite moved the earlier run, until this one succeeds
    fresh: bool = False  # the claim found no directory, or an empty one

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, failed, *exc) -> None:
        if self.replaced is not None and failed is None:  # this run's results are in: the old run can go
            shutil.rmtree(self.replaced, ignore_errors=True)
        if failed is not None and self.fresh and self.lock_fd is not None and not earlier_run(self.path):
            self._forget()
        self.release()

    def _forget(self) -> None:
        """A rejected or failed run in a directory it found empty leaves nothing behind (a
        config.toml with no results would make the next run there refuse it as 'another
        run'); anything it saved worth keeping (a checkpoint) stays, and so does the directory then."""
        for name in ("config.toml", "launch.toml", "checkpoints", LOCK):
            target = self.path / name
            try:
                target.rmdir() if target.is_dir() and not target.is_symlink() else target.unlink()
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass

    def unchanged(self) -> str:
        """The end of a failure's one line: what it did (not) do to the directory."""
        if self.earlier:
            return f"the earlier files in {self.path} ({', '.join(self.earlier)}) are unchanged"
        if self.replaced is not None:
            return f"no results were written; the run it was to replace is kept in {self.replaced}"
        return f"no results were written to {self.path}"


def earlier_run(path: Path) -> list[str]:
    """The files of a run already in ``path`` (an empty or new directory has none)."""
    if not path.is_dir():
        return []
    found = [name for name in RUN_FILES if (path / name).exists()]
    if "checkpoints" in found and not any((path / "checkpoints").iterdir()):
        found.remove("checkpoints")  # an empty folder left by a run that saved nothing
    if set(found) <= {"config.toml", "launch.toml"}:
        return []  # a run that failed before it saved anything: nothing there to lose
    return found


def claim(path: str | Path, resume: str | None, overwrite: bool, command: str | None = None) -> RunDir:
    """Take ``path`` for this run, or raise UsageError (exit 2) saying why not; see the module doc."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--run-dir {path} is a file; expected a directory (new, empty, or a run to --resume)")
    if (path / LOCK).is_file():  # a live run is named before anything else is said about the directory
        try:
            _lock(path, create=False)
        except OSError:  # unreadable: the lock taken below says what is wrong
            pass
    earlier = earlier_run(path)
    if earlier and resume is None and not overwrite:
        what = "a finished run" if "summary.json" in earlier else "another run"
        raise UsageError(f"--run-dir {path} holds {what} ({', '.join(earlier)}); pass --resume auto to continue "
                         "it, --overwrite to replace it, or another --run-dir")
    checkpoint = _resumed_checkpoint(resume, path)
    if earlier and resume is not None and checkpoint is None:
        raise UsageError(f"--resume {resume}: {path} holds a run ({', '.join(earlier)}) but no complete checkpoint "
                         "to continue from; pass --overwrite to replace it, or another --run-dir")
    foreign = bool(earlier) and checkpoint is not None and not _same_run(checkpoint, path)
    if foreign and not overwrite:
        raise UsageError(f"--resume {resume}: that checkpoint is of another run than the one in --run-dir {path} "
                         f"({', '.join(earlier)}); resuming would replace that run's results. Pass another "
                         "--run-dir, or --overwrite to replace it (its files are kept aside until this run succeeds)")
    run_id = (run_id_of(checkpoint) if checkpoint else None) or uuid.uuid4().hex[:12]
    fresh = not path.exists() or not any(path.iterdir())
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, create=True)
    except OSError as exc:
        raise UsageError(f"--run-dir {path}: cannot write there ({exc.strerror}); nothing was written") from None
    holder = f"pid {os.getpid()}: {command or ' '.join(['gpupar', *sys.argv[1:]])}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    run = RunDir(path, run_id, fd, fresh=fresh)
    if overwrite and earlier and (resume is None or foreign):
        run.replaced = path / f".replaced-{uuid.uuid4().hex[:12]}"
        run.replaced.mkdir()
        for name in earlier:
            os.replace(path / name, run.replaced / name)
    else:
        run.earlier = earlier
    return run


def _lock(path: Path, create: bool) -> int:
    """An exclusive, non-blocking flock on RUN/.gpupar.lock; a held one is refused naming its holder."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = open_nofollow(path / LOCK, flags)  # a link planted there must not be truncated through
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise UsageError(f"--run-dir {path} is in use by a running gpupar ({holder}); wait for it, "
                             "or pass another --run-dir") from None
        raise
    if not create:
        os.close(fd)  # only a probe: the real lock is taken once the directory is accepted
    return fd


def _same_run(checkpoint: Path, path: Path) -> bool:
    """Whether ``checkpoint`` belongs to the run in ``path``: it lies in that run's checkpoints
    folder, or it carries the run id that the run's summary or checkpoints carry."""
    if checkpoint.resolve().parent == (path / "checkpoints").resolve():
        return True
    theirs = run_id_of(checkpoint)
    ours = {run_id_of(p) for p in complete_checkpoints(path / "checkpoints")}
    try:
        summary = json.loads((path / "summary.json").read_text())
        ours.add(summary.get("run_id") if isinstance(summary, dict) else None)
    except (OSError, ValueError, RecursionError):
        pass
    return theirs is not None and theirs in ours


def check_not_run_file(out: str | Path, flag: str) -> None:
    """Refuse an output path that is one of a run's own files (``RUN/metrics.jsonl``, its
    weights, its config): a command's output must not replace what a run wrote."""
    out = Path(out)
    if out.name in RUN_FILES and earlier_run(out.parent) and out.parent.is_dir():
        raise UsageError(f"{flag} {out} is a file of the run in {out.parent}; write the output outside that run "
                         "directory, or under another name")


def check_not_in_another_run(out: str | Path, flag: str, own: Path | None = None) -> None:
    """Refuse an output path inside a run directory other than ``own`` (the run the command
    reads from): an export or a prediction must not add to, or replace, another run's files."""
    top = own.resolve() if own is not None and own.is_dir() else None
    for parent in Path(out).absolute().parents:
        if parent.is_dir() and earlier_run(parent) and parent.resolve() != top:
            raise UsageError(f"{flag} {out} lies inside the run directory {parent} ({', '.join(earlier_run(parent))}), "
                             "of another run; write it outside that run")


def run_id_of(checkpoint: Path) -> str | None:
    """The id of the run that saved ``checkpoint`` (None for one without, or unreadable)."""
    try:
        run_id = json.loads((checkpoint / "trainer.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return run_id if isinstance(run_id, str) and run_id.isalnum() else None


def _resumed_checkpoint(resume: str | None, path: Path) -> Path | None:
    """The checkpoint a --resume continues, if any; its run id becomes this run's, so its
    checkpoints and the new ones are pruned together. It is checked fully when loaded."""
    if resume is None:
        return None
    return resolve_resume(resume, path)


def for_rank(cfg, is_main: bool, command: str = "") -> RunDir:
    """The run directory as a rank of a started job sees it. A rank started by gpupar's
    launcher finds it claimed (``GPUPAR_RUN_ID``); rank 0 under an outside torchrun claims it
    here; the other ranks of an outside torchrun only need the path."""
    path = default_path(cfg.train.run_dir)
    if RUN_ID_ENV in os.environ:
        run_id = os.environ[RUN_ID_ENV]
        return RunDir(path, run_id, earlier=["config.toml"] if (path / "config.toml").exists() else [])
    if not is_main:
        return RunDir(path, "")
    return claim(path, cfg.checkpoint.resume, cfg.train.overwrite, command)


def default_path(run_dir: str | None, prefix: str = "") -> Path:
    """``--run-dir``, or ``runs/<prefix><timestamp>`` (train and verify: no prefix; ``sweep-``, ``bench-``)."""
    return Path(run_dir or Path("runs") / time.strftime(f"{prefix}%Y%m%d-%H%M%S"))


# --- finding checkpoints --------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under ``root`` (RUN/checkpoints), oldest first; partial ones ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """``auto`` -> the newest complete checkpoint of this run (None when there is none yet);
    a PATH -> that checkpoint, or the newest complete one under a run or checkpoints directory."""
    if spec == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--resume {spec}: no such checkpoint directory; pass auto or a RUN/checkpoints/step-N path")
    if (path / ".metadata").exists() or STEP_DIR.fullmatch(path.name):
        if not (path / COMPLETE).is_file():
            raise UsageError(f"--resume {spec}: incomplete checkpoint (no {COMPLETE} marker: its save was "
                             "interrupted); resume from an earlier one or use --resume auto")
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise UsageError(f"--resume {spec}: holds no complete checkpoint (expected step-N/ with a {COMPLETE} marker)")
