"""gpupar: train a plain PyTorch model on one device, many GPUs, many nodes, or many models at once.

The API's names load on first use (PEP 562): ``import gpupar`` and every ``gpupar`` command
start without torch's distributed packages (DTensor, DCP: about a second of imports), which a
refused flag, ``--help`` or a launcher's parent process never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gpupar.config import Config

if TYPE_CHECKING:
    from gpupar.api import train, verify
    from gpupar.models import SimpleNN
    from gpupar.notebook import notebook_launch
    from gpupar.ownloop import setup
    from gpupar.training.state import TrainResult

__version__ = "0.1.0"
__all__ = ["Config", "SimpleNN", "TrainResult", "notebook_launch", "setup", "train", "verify", "__version__"]

_HOMES = {"SimpleNN": "gpupar.models", "TrainResult": "gpupar.training.state", "train": "gpupar.api",
          "verify": "gpupar.api", "notebook_launch": "gpupar.notebook", "setup": "gpupar.ownloop"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'gpupar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
