"""Saving and loading weights safely: nothing gpupar reads from disk can run code.

Weights are written as safetensors (no code can ride along) through a temporary file and
an atomic rename, so a crash never leaves a half-written ``model.safetensors``. Legacy
``.pt`` state dicts load only with ``weights_only=True``; there is no unsafe fallback.

Distributed checkpoints (``torch.distributed.checkpoint``, DCP) have two unsafe spots in
PyTorch's stock reader: the ``.metadata`` file is a plain pickle, and non-tensor values
(optimizer hyper-parameters) are read with ``torch.load(weights_only=False)``. ``SafeReader``
unpickles the metadata with an allow-list of DCP's own record classes, and
``SafeLoadPlanner`` reads the values with ``weights_only=True``.
"""

from __future__ import annotations

import enum
import io
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpupar.errors import UsageError
from gpupar.files import atomic_write, check_out_path


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, flag: str = "--out") -> Path:
    """Write a full state dict to ``path`` atomically (temp file in its directory + rename)."""
    return atomic_write(check_out_path(path, flag), weights_writer(state_dict))


def weights_writer(state_dict: dict[str, torch.Tensor]):
    """``write(path)`` for ``files.atomic_write``: the state dict as safetensors, on the CPU."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "writer": "gpupar"})


def check_weights_out(path: str | Path, flag: str) -> Path:
    """An output path for weights that ``gpupar predict --weights`` can read back: a file
    (not a directory) ending in .safetensors. Called before the work that produces them."""
    return check_out_path(path, flag, suffix=".safetensors")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or from .pt/.pth with ``weights_only=True`` only."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--weights {path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"--weights {path}: not a valid safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses anything but tensors and plain containers
        raise UsageError(f"--weights {path}: refused to load; only plain tensors are accepted "
                         f"(weights_only=True): {refusal(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: expected a dict of tensors (a state_dict)")
    return state


def refusal(exc: BaseException) -> str:
    """Why the weights_only unpickler refused a file, in one line: the code it would have run."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it references {match.group(1)}, which could run code"
    # torch's own text advises re-running with weights_only=False, which would run the code:
    # keep only its reason ("WeightsUnpickler error: ...") or a line without that advice.
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if match:
        return match.group(1).strip()
    lines = [line for line in text.strip().splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else f"{type(exc).__name__} (not a plain tensor file)"


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a full state dict, naming the first missing, unexpected or mis-shaped parameter."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UsageError(f"{source}: parameters do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for k, v in own.items():
        if v.shape != state[k].shape:
            raise UsageError(f"{source}: parameter {k!r} has shape {list(state[k].shape)}, "
                             f"the model expects {list(v.shape)}")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
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
