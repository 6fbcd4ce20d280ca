"""Reading distributed checkpoints (``torch.distributed.checkpoint``, DCP) safely.

PyTorch's stock reader has two unsafe spots: the ``.metadata`` file is a plain pickle, and
non-tensor values (optimizer hyper-parameters) are read with ``torch.load(weights_only=False)``.
``SafeReader`` unpickles the metadata with an allow-list of DCP's own record classes, and
``SafeLoadPlanner`` reads the values with ``weights_only=True``.
"""

from __future__ import annotations

import enum
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from gpupar.weights import refusal


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
    return metadata


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
