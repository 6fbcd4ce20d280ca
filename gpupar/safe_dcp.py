"""Reading distributed checkpoints (``torch.distributed.checkpoint``, DCP) safely.

PyTorch's stock reader has two unsafe spots: the ``.metadata`` file is a plain pickle, and
non-tensor values (optimizer hyper-parameters) are read with ``torch.load(weights_only=False)``.
``SafeReader`` unpickles the metadata with an allow-list of DCP's own record classes, and
``SafeLoadPlanner`` reads the values with ``weights_only=True``.

DCP also trusts its metadata's shard paths: an absolute path, or ``../``, reads any file, and
a FIFO blocks for ever. ``read_dcp_metadata`` refuses a path that leads outside the
checkpoint or to anything but a regular file, and a slice beyond its file's end. And DCP
keeps no integrity record: ``seal`` writes a SHA-256 per file into the ``COMPLETE`` marker
when a checkpoint is committed, and ``check_seal`` holds every file to it before a resume
or an export reads anything (flipped bytes in a shard would otherwise load silently).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import pickle
import stat
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from gpupar.errors import UsageError
from gpupar.run.files import atomic_write_text
from gpupar.run.rundir import COMPLETE
from gpupar.weights import refusal

SEAL_FORMAT = 1


# Distributed checkpoints (DCP): a reader and a planner that never unpickle arbitrary objects.

_DCP_RECORD_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, allowing only the plain records it is made of.

    Allowed: dataclasses and enums of DCP's metadata/filesystem modules, ``torch.Size``, torch
    dtypes, layouts and memory formats, and pathlib paths. Anything else (``os.system``,
    ``builtins.eval``, ...) is refused before it is called.
    """

    def find_class(self, module: str, name: str):
        if module in _DCP_RECORD_MODULES:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) and (hasattr(obj, "__dataclass_fields__") or issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout  # maps a name to a torch.layout
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath"):
            return getattr(__import__("pathlib"), name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not part of a DCP checkpoint's metadata)")


def read_dcp_metadata(checkpoint: str | Path) -> Metadata:
    """The checkpoint's metadata (keys, shapes, dtypes), read with the allow-listed unpickler."""
    with open(Path(checkpoint) / ".metadata", "rb") as fh:
        metadata = _MetadataUnpickler(fh).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP Metadata")
    check_storage(metadata, Path(checkpoint))
    return metadata


def check_storage(metadata: Metadata, root: Path) -> None:
    """Every shard the metadata names is a regular file inside ``root``, and every slice of it
    lies within the file: DCP itself would open whatever path the metadata holds."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise ValueError(".metadata has no storage table (state_dict_metadata and storage_data)")
    top, sizes = root.resolve(), {}
    for info in storage.values():
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not isinstance(rel, str) or not all(isinstance(v, int) and v >= 0 for v in (offset, length)):
            raise ValueError(f"a shard record is malformed ({_short(repr(info))})")
        if rel not in sizes:
            real = (root / rel).resolve()
            if top not in real.parents:
                raise ValueError(f"shard path {_short(rel)!r} leads outside the checkpoint directory")
            try:
                st = os.stat(real)
            except OSError as exc:
                raise ValueError(f"shard {_short(rel)!r}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"shard {_short(rel)!r} is not a regular file")
            sizes[rel] = st.st_size
        if offset + length > sizes[rel]:
            raise ValueError(f"shard {_short(rel)!r}: bytes {offset}..{offset + length} lie beyond its end "
                             f"({sizes[rel]} bytes)")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- integrity: a SHA-256 per file, recorded when the checkpoint is committed -------------------

def checkpoint_files(directory: Path) -> dict[str, Path]:
    """The files of a checkpoint directory but its marker, by relative path; anything that
    is not a regular file (a symlink, a FIFO, a device) is refused, never opened."""
    found = {}
    for here, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = Path(here) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            rel = str(path.relative_to(directory))
            if not stat.S_ISREG(mode):
                raise ValueError(f"{rel} is not a regular file")
            if rel != COMPLETE:
                found[rel] = path
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(directory: Path) -> None:
    """Write the ``COMPLETE`` marker: a SHA-256 of every file, atomically (a crash leaves no
    marker, so no half-written checkpoint is ever resumed)."""
    hashes = {rel: _sha256(path) for rel, path in sorted(checkpoint_files(directory).items())}
    atomic_write_text(directory / COMPLETE, json.dumps({"format": SEAL_FORMAT, "sha256": hashes}, indent=1) + "\n")


def check_seal(directory: Path, where: str) -> None:
    """Hold every file of a committed checkpoint to the hashes its marker recorded: one line
    naming the first file that is missing, extra or changed. A marker written before hashes
    were recorded (``ok``) is accepted as it was."""
    marker = directory / COMPLETE
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode) or os.lstat(marker).st_size > 64 << 20:
            raise ValueError("not a regular file of a sane size")
        text = marker.read_text()
        if text == "ok\n":
            return
        record = json.loads(text)
        hashes = record["sha256"] if isinstance(record, dict) and record.get("format") == SEAL_FORMAT else None
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise ValueError('expected {"format": 1, "sha256": {file: hex}}')
        files = checkpoint_files(directory)
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: corrupt checkpoint ({COMPLETE} marker or files unreadable: "
                         f"{_short(str(exc))})") from None
    for rel in sorted(set(hashes) | set(files)):
        if rel not in files:
            problem = "is missing"
        elif rel not in hashes:
            problem = f"is not one of the files its {COMPLETE} marker lists"
        elif _sha256(files[rel]) != hashes[rel]:
            problem = f"does not match the SHA-256 its {COMPLETE} marker recorded (changed or corrupted)"
        else:
            continue
        raise UsageError(f"{where}: corrupt checkpoint: {_short(rel)} {problem}; resume from an earlier "
                         "checkpoint or train again")


class SafeReader(FileSystemReader):
    """PyTorch's file-system reader with the pickled ``.metadata`` read safely (tensor data is
    already read with ``weights_only=True`` by the stock reader)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor values load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)  # refuses code-carrying pickles
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(f"refused to load {read_item.dest_index.fqn}: {refusal(exc)}") from None
        clean = io.BytesIO()
        torch.save(obj, clean)  # re-serialised from plain values: safe for the stock loader
        clean.seek(0)
        super().load_bytes(read_item, clean)
