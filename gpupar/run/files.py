"""Writing output files safely: check the path first, then write atomically.

A path is checked before any work is done (an hour of training must not end in "is a
directory"), and every file is written to a temporary file in the same directory, flushed
to disk and renamed over the target, so a crash or a full disk never leaves a half-written
file, nor a stray temporary one: on failure the temporary file is removed.
"""

from __future__ import annotations

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
    if suffix and p.suffix != suffix:
        raise UsageError(f"{flag} {path}: expected a file name ending in {suffix} (got "
                         f"{p.suffix or 'no suffix'!r}); gpupar reads it back by that suffix")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
    return p


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
