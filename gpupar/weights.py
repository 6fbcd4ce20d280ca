"""Saving and loading weights safely: nothing gpupar reads from disk can run code.

Weights are written as safetensors (no code can ride along) through a temporary file and
an atomic rename, so a crash never leaves a half-written ``model.safetensors``. Legacy
``.pt`` state dicts load only with ``weights_only=True``; there is no unsafe fallback.
Reading distributed checkpoints safely is ``safe_dcp.py``'s (it imports DCP, which a run
without checkpoints never needs).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpupar.errors import UsageError
from gpupar.run.files import atomic_write, check_out_path


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
        state = load_plain(path)
    except Exception as exc:  # the unpickler refuses anything but tensors and plain containers
        raise UsageError(f"--weights {path}: refused to load; only plain tensors are accepted "
                         f"(weights_only=True): {refusal(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: expected a dict of tensors (a state_dict)")
    return state


def load_plain(path: Path):
    """``torch.load(weights_only=True)`` with its warnings held back: a hostile pickle's refusal
    is gpupar's one line, not the unpickler's "unsupported operand" warning above it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


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
    params = {name for name, _ in model.named_parameters()}
    for k, v in own.items():
        if v.shape != state[k].shape:
            raise UsageError(f"{source}: parameter {k!r} has shape {list(state[k].shape)}, "
                             f"the model expects {list(v.shape)}")
        if v.is_floating_point() != state[k].is_floating_point():  # a cast would make other weights silently
            raise UsageError(f"{source}: parameter {k!r} has dtype {state[k].dtype}, the model expects {v.dtype}")
        if k in params and v.is_floating_point() and not torch.isfinite(state[k]).all():
            raise UsageError(f"{source}: parameter {k!r} holds NaN or Inf; these weights would predict NaN")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
