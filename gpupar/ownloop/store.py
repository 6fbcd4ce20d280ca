"""``gp.save`` / ``gp.load``: a user's state dict of modules, optimizers and plain values on
DCP, resharded across layouts as the CLI's checkpoints are (and read with the safe reader).

The names are the unparallelised model's (no DDP ``module.``, no pipeline ``stages.0.``;
``pipeline_state`` as the CLI's checkpoints use it), so a checkpoint saved under FSDP at 2
processes loads on one process, under TP or under a pipeline, and the other way round.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import set_model_state_dict

from gpupar.errors import UsageError
from gpupar.parallel.pipeline_state import is_pipeline, load_state_dicts, model_state, state_dicts, whole_name
from gpupar.safe_dcp import SafeLoadPlanner, SafeReader
from gpupar.topology import Topology


def _the_model(state: dict) -> nn.Module | None:
    models = [v for v in state.values() if isinstance(v, nn.Module)]
    if len(models) > 1 and any(isinstance(v, torch.optim.Optimizer) for v in state.values()):
        raise UsageError("gp.save/gp.load with optimizers takes one model in the state dict")
    if not models and any(isinstance(v, torch.optim.Optimizer) for v in state.values()):
        raise UsageError("gp.save/gp.load of an optimizer needs its model in the same state dict")
    return models[0] if models else None


def _flat(state: dict) -> dict:
    """``state`` with each module and optimizer as its DCP state dict (the whole model's names)."""
    model = _the_model(state)
    optimizers = [k for k, v in state.items() if isinstance(v, torch.optim.Optimizer)]
    out = {}
    for key, value in state.items():
        if isinstance(value, nn.Module) and not optimizers:
            out[key] = model_state(value)
        elif not isinstance(value, (nn.Module, torch.optim.Optimizer)):
            out[key] = value
    for key in optimizers:  # the model's state comes with each optimizer's (one call names both)
        model_sd, out[key] = state_dicts(model, state[key])
        out.update({k: model_sd for k, v in state.items() if v is model})
    return out


def save(path, state: dict, topo: Topology) -> None:
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_flat(state), checkpoint_id=str(Path(path)), no_dist=not dist.is_initialized())


def load(path, state: dict, topo: Topology) -> dict:
    flat = _flat(state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=SafeReader(str(Path(path))), planner=SafeLoadPlanner(),
                 no_dist=not dist.is_initialized())
    model = _the_model(state)
    model_key = next((k for k, v in state.items() if v is model), None)
    optimizers = [k for k, v in state.items() if isinstance(v, torch.optim.Optimizer)]
    for key in optimizers:
        load_state_dicts(model, state[key], flat[model_key], flat[key])
    for key, value in state.items():
        if isinstance(value, nn.Module) and not optimizers:
            _set_model(value, flat[key])
        elif not isinstance(value, (nn.Module, torch.optim.Optimizer)):
            state[key] = flat[key]
    return state


def _set_model(model: nn.Module, whole: dict) -> None:
    """``set_model_state_dict`` from the whole model's names (a pipeline's own, prefixed)."""
    if is_pipeline(model):  # each own name (a tie's copies, two stages on one rank: several) takes its value
        whole = {k: whole[whole_name(k)] for k in model.state_dict()}
    set_model_state_dict(model, whole)
