"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input from the user: a flag, a file, a shape. The message names the bad value
    and what would be accepted."""


class TrainingError(Exception):
    """Training stopped for a reason the user must see (a non-finite loss, a failed rank)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the job: every rank was stopped; exit 128 + the signal number.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def raise_interrupted(signum, frame) -> None:
    """A SIGTERM handler: stop the launcher as Ctrl-C does."""
    raise Interrupted(signum)


def in_main_thread() -> bool:
    """Signal handlers can only be set from the main thread (not, say, a notebook's worker)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def stdout_closed() -> int:
    """The reader of stdout went away (``gpupar runs | head -1``): stop quietly, exit 0.

    stdout is pointed at /dev/null first, or the interpreter's final flush of the lines
    still buffered would raise BrokenPipeError again on the way out.
    """
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (stdout captured in-process)
        pass
    return 0


def first_line(exc: BaseException, fallback: str | None = None) -> str:
    """An exception's message cut to its first non-blank line, for a one-line error (its type's
    name, or ``fallback``, when it has no message). Many of torch's errors run to pages."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else (fallback if fallback is not None else type(exc).__name__)


class _LogStream:
    """stdout or stderr, where a reader that went away (``gpupar train | head -1``) or a
    closed descriptor costs only the lines written after it: the first failed write points
    the descriptor at /dev/null, and training goes on to save its results."""

    def __init__(self, stream):
        self._stream, self.lost = stream, False

    def _guard(self, call, *args):
        if self.lost:
            return len(args[0]) if args else None
        try:
            return call(*args)
        except (OSError, ValueError):  # EPIPE, EBADF, or a stream closed under us
            self.lost = True
            import os

            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            except (OSError, ValueError):
                pass
            return len(args[0]) if args else None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_streams():
    """Wrap sys.stdout and sys.stderr in ``_LogStream``; returns the function that puts them back."""
    import sys

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LogStream(sys.stdout), _LogStream(sys.stderr)

    def restore() -> None:
        sys.stdout, sys.stderr = saved

    return restore
