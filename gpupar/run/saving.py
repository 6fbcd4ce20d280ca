"""A checkpoint save that a signal or a full disk cannot leave half done.

Two traps sit inside ``torch.distributed.checkpoint.save``:

- an interrupt (Ctrl-C's KeyboardInterrupt, gpupar's ``Interrupted`` for SIGTERM) raised
  anywhere in it is wrapped into DCP's ``CheckpointException``, or lost altogether inside
  torch's zip writer (it resurfaces as "unexpected pos"), and the run ends in a traceback
  with exit 1 instead of 130 / 143;
- ``CheckpointException`` derives from ``BaseException``, so ``except Exception`` misses
  it: a full disk under DCP was a traceback too.

``signals_held`` holds SIGINT and SIGTERM for the length of a save, and ``save_failed``
turns whatever DCP raised into what the CLI reports: the signal, or one line naming the
cause (``No space left on device``).
"""

from __future__ import annotations

import contextlib
import os
import signal

from gpupar.errors import Interrupted, TrainingError, first_line, in_main_thread

_STOPPED: list[int] = []  # the signal that aborted a held save (a second one): DCP may hide it


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM while a checkpoint is written, where they are turned into
    exceptions (gpupar's CLI): the save ends (seconds), then the held signal stops the run
    with the new checkpoint committed. A second signal stops it at once. Ranks are left
    alone: their launcher stops them, and a half-written checkpoint is never committed."""
    if not in_main_thread() or "LOCAL_RANK" in os.environ:
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    held: list[int] = []

    def hold(signum, frame) -> None:
        if held:  # asked twice: stop now
            _STOPPED.append(signum)
            previous[signum](signum, frame)
        held.append(signum)

    raising = [s for s, h in previous.items() if callable(h)]  # SIG_DFL / SIG_IGN: not ours to change
    for s in raising:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s in raising:
            signal.signal(s, previous[s])
    if held:
        previous[held[0]](held[0], None)


def save_failed(exc: BaseException, step: int, directory: str | os.PathLike, kept: bool) -> BaseException:
    """What a failed save of ``step`` into ``directory`` raises: the signal that stopped it,
    or one line naming the cause (a full disk, a quota, a read-only mount) and whether
    earlier checkpoints are ``kept`` to resume from."""
    from torch.distributed.checkpoint import CheckpointException

    inner = [e for e, _ in exc.failures.values()] if isinstance(exc, CheckpointException) and exc.failures else [exc]
    stop = next((e for e in inner if isinstance(e, (KeyboardInterrupt, Interrupted))), None)
    if stop is not None:
        return stop
    if _STOPPED:  # a second signal aborted the save: whatever DCP made of it, it is that signal
        signum = _STOPPED.pop()
        return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)
    cause = inner[0]
    if isinstance(cause, OSError) and cause.strerror:
        what = cause.strerror + (f" ({cause.filename})" if cause.filename else "")
    else:
        what = _full(directory) or f"{type(cause).__name__}: {first_line(cause)}"
    left = "the earlier checkpoints are kept" if kept else "no checkpoint of this run was committed before it"
    return TrainingError(f"the checkpoint of step {step} could not be written: {what}; {left}")


def _full(directory) -> str | None:
    """Why a write failed when torch's zip writer lost the OSError ("unexpected pos"): a full
    disk, or the file size limit (``ulimit -f``, a write past it fails with EFBIG)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return f"File too large (the file size limit, ulimit -f, is {soft} bytes)"
    except (ImportError, OSError, ValueError):
        pass
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(directory)))
    except OSError:
        return None
    free = fs.f_bavail * fs.f_frsize
    if free < max(1 << 20, fs.f_blocks * fs.f_frsize // 1000):
        return f"No space left on device ({free} bytes free where it is written)"
    return None
