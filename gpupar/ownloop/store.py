"""``gp.save`` / ``gp.load``: a user's state dict of modules, optimizers and plain values on
DCP, resharded across layouts as the CLI's checkpoints are (and read with the safe reader)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from gpupar.errors import UsageError
from gpupar.safe_dcp import SafeLoadPlanner, SafeReader
from gpupar.topology import Topology


def _the_model(state: dict) -> nn.Module | None:
    models = [v for v in state.values() if isinstance(v, nn.Module)]
    if len(models) > 1 and any(isinstance(v, torch.optim.Optimizer) for v in state.values()):
        raise UsageError("gp.save/gp.load with optimizers takes one model in the state dict")
    return models[0] if models else None


def _flat(state: dict) -> dict:
    model = _the_model(state)
    out = {}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            out[key] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            out[key] = get_optimizer_state_dict(model, value)
        else:
            out[key] = value
    return out


def save(path, state: dict, topo: Topology) -> None:
    dcp.save(_flat(state), checkpoint_id=str(Path(path)), no_dist=not dist.is_initialized())


def load(path, state: dict, topo: Topology) -> dict:
    flat = _flat(state)
    dcp.load(flat, storage_reader=SafeReader(str(Path(path))), planner=SafeLoadPlanner(),
             no_dist=not dist.is_initialized())
    model = _the_model(state)
    for key, value in state.items():
        if isinstance(value, nn.Module):
            set_model_state_dict(value, flat[key])
        elif isinstance(value, torch.optim.Optimizer):
            set_optimizer_state_dict(model, value, flat[key])
        else:
            state[key] = flat[key]
    return state
