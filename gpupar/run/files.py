"""Writing output files safely: check the path first, then write atomically.

A path is checked before any work is done (an hour of training must not end in "is a
directory"), and every file is written to a temporary file in the same directory, flushed
to disk and renamed over the target, so a crash or a full disk never leaves a half-written
file, nor a stray temporary one: on failure the temporary file is removed.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from gpupar.errors import UsageError


def check_out_path(path: str | Path, flag: str, suffix: str | None = None) -> Path:
    """Refuse an output path that cannot become a file, naming the flag and what is accepted.

    ``suffix`` is required when another command reads the file by its suffix (predict
    reads weights as safetensors only when they end in ``.safetensors``).
    """
    p = Path(path)
    if str(path) == "":
        raise UsageError(f"{flag} is empty; expected a file path" + (f" ending in {suffix}" if suffix else ""))
    if p.is_dir() or str(path).endswith(os.sep):
        raise UsageError(f"{flag} {str(path)!r} is a directory; expected a file path"
                         + (f" ending in {suffix}" if suffix else ""))
    if p.exists() and not p.is_file() and not p.is_dir():  # renamed over, a device node would become a file
        raise UsageError(f"{flag} {path} is not a regular file (a device, a FIFO or a socket); expected a file path")
    if suffix and p.suffix != suffix:
        raise UsageError(f"{flag} {path}: expected a file name ending in {suffix} (got "
                         f"{p.suffix or 'no suffix'!r}); gpupar reads it back by that suffix")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
    if parent is not None:
        _probe_writable(parent, f"{flag} {path}")
    return p


def _probe_writable(directory: Path, where: str) -> None:
    """Create and remove a temporary file in ``directory``: the only test that a read-only
    mount, a permission or a quota gives the same answer as the real write will."""
    try:
        fd, name = tempfile.mkstemp(prefix=".gpupar-probe.", dir=directory)
    except OSError as exc:
        raise UsageError(f"{where}: cannot write into {directory} ({exc.strerror or exc}); pick a writable "
                         "place") from None
    os.close(fd)
    os.unlink(name)


def check_not_input(out: str | Path, flag: str, inputs: dict[str, str | Path]) -> None:
    """Refuse an output that is one of the command's inputs (the same file, by inode, so a
    link or another spelling of the path is caught too): writing it would destroy what is read."""
    try:
        here = os.stat(out)
    except OSError:
        return  # not there yet: it cannot be an input
    for name, path in inputs.items():
        try:
            same = os.path.samestat(here, os.stat(path))
        except OSError:
            continue
        if same:
            raise UsageError(f"{flag} {out} is the same file as {name} {path}; it would be overwritten by the "
                             "output it is read for. Write the output somewhere else")


def check_inside(path: str | Path, root: str | Path, what: str) -> Path:
    """``path`` with symlinks resolved, refused unless it stays inside ``root``: a file gpupar
    writes or reads in a run directory is never reached through a link that leads out of it."""
    real, top = Path(path).resolve(), Path(root).resolve()
    if real != top and top not in real.parents:
        raise UsageError(f"{what} {path} leads outside {root} (to {real}, through a symlink); refused")
    return real


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink as the last component (O_NOFOLLOW): gpupar never
    truncates or writes a file a link points at (the lock file of a run directory above all)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symlink; gpupar writes only regular files it owns there (remove "
                             "the link)") from None
        raise


def write_nofollow(path: str | Path, data: bytes) -> None:
    """Create or replace the small file ``path`` with ``data``, never through a symlink, and fsync it."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp)``, then fsync and rename; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_many([(path, write)])
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_many(items: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write several files as one result: every temporary file is written and fsynced first,
    then all are renamed in order. A failure while writing (a full disk, a read-only
    directory) removes the temporary files and renames nothing, so the targets keep their
    earlier contents byte for byte; renames need no space and do not fail that way.

    Each temporary file is created with mode 0o666 & ~umask, as ``open()`` would create the
    target itself, so the rename does not leave a file that only its owner can read.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, write in items:
            path = Path(path)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            written.append((Path(name), path))
            write(Path(name))
            os.chmod(name, 0o666 & ~umask())
            with open(name, "rb+") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in written:
        os.replace(tmp, path)
