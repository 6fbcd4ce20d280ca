"""Saving and loading weights safely.

Weights are written as safetensors (no code can ride along) through a temporary file and
an atomic rename, so a crash never leaves a half-written ``model.safetensors``. Legacy
``.pt`` state dicts load only with ``weights_only=True``; there is no unsafe fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpupar.errors import UsageError


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a full state dict to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "writer": "gpupar"})
    os.replace(tmp, path)
    return path


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--weights {path}: refused to load; only plain tensors are accepted "
                         f"(weights_only=True): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: expected a dict of tensors (a state_dict)")
    return state


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


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict that a single-device model loads, on rank 0.

    Collective for sharded models: every rank must call it. FSDP keeps each parameter as a
    DTensor shard; ``get_model_state_dict`` all-gathers them one at a time into CPU memory
    on rank 0 (other ranks get an empty dict), so no rank ever holds the whole model on its
    device at once. DDP / DataParallel wrappers lose their ``module.`` prefix; a plain
    module's own state dict is returned as is.
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return getattr(model, "module", model).state_dict()
