"""A pipeline's model and optimizer state under the unparallelised model's names, for DCP.

``Pipeline`` holds this rank's stages in ``stages``, so ``get_state_dict`` names a parameter
``stages.0.blocks.3.up.weight``; each stage module itself keeps the whole model's names
(``blocks.3.up.weight``). A checkpoint must carry the whole model's names, so that a pipeline's
checkpoint loads on one device, under DDP or FSDP, and theirs under a pipeline: each stage
saves its own disjoint part through DCP, and DCP joins them (torchtitan's ``ModelWrapper``
merges its model parts' state dicts the same way).

The optimizer's ``param_groups`` are one value per group in DCP, written once for all ranks:
they list every stage's parameters (gathered over the pipeline), as one device would; on load
each rank keeps its own parameters' names and the group's saved hyper-parameters.

A tied Parameter (``tied.StageTies``) has one copy per stage that holds it, bit-equal: the
model state keeps each of its names once (as one device's state dict has them all), and the
optimizer state and groups name it by the tie's first name only, as one device's optimizer
does; on load every copy takes that one value.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

_STAGE = re.compile(r"^stages\.\d+\.")


def is_pipeline(model: nn.Module) -> bool:
    return hasattr(model, "stage_ids") and isinstance(getattr(model, "stages", None), nn.ModuleList)


def whole_name(name: str) -> str:
    """A pipeline's parameter name (``stages.0.blocks.3.up.weight``) in the whole model (``blocks.3.up.weight``)."""
    return _STAGE.sub("", name, count=1)


def model_state(model: nn.Module) -> dict:
    """``get_model_state_dict`` under the whole model's names."""
    state = get_model_state_dict(model)
    return {whole_name(k): v for k, v in state.items()} if is_pipeline(model) else state


def _optim_name(model: nn.Module, name: str) -> str:
    """A pipeline's optimizer-state name in the whole model: a tied copy's is the tie's first name."""
    whole = whole_name(name)
    return model.ties.alias.get(whole, whole)


def state_dicts(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """``get_state_dict(model, optimizer)``; for a pipeline, under the whole model's names, with
    each param group listing every stage's parameters (a collective over the pipeline), a tie once."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if not is_pipeline(model):
        return model_sd, optim_sd
    groups = []
    for group in optim_sd["param_groups"]:
        mine = [_optim_name(model, p) for p in group["params"]]
        everyone: list = [None] * dist.get_world_size(model.pp_group)
        dist.all_gather_object(everyone, mine, group=model.pp_group)
        groups.append({**group, "params": list(dict.fromkeys(p for names in everyone for p in names))})
    return ({whole_name(k): v for k, v in model_sd.items()},
            {"state": {_optim_name(model, k): v for k, v in optim_sd["state"].items()}, "param_groups": groups})


def load_state_dicts(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """``set_state_dict`` with what ``state_dicts`` gave and DCP filled in."""
    if not is_pipeline(model):
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return
    own_model, own_optim = get_state_dict(model, optimizer)  # this rank's names, with the stage prefix
    # Several own names may take one whole name's value: a tie's copies, two stages on one rank.
    mine = [[p for p in g["params"]] for g in own_optim["param_groups"]]
    optim = {"state": _own_states(model, own_optim["state"], optim_sd["state"]),
             "param_groups": [{**saved, "params": params} for saved, params in zip(optim_sd["param_groups"], mine)]}
    set_state_dict(model, optimizer, model_state_dict={k: model_sd[whole_name(k)] for k in own_model},
                   optim_state_dict=optim)


def _own_states(model: nn.Module, own: dict, saved: dict) -> dict:
    """Each own parameter's optimizer state from its whole name's; the second and later copies
    of a tie on this rank get their own clones (the optimizer would otherwise keep one state
    for two parameters and step it twice)."""
    out, used = {}, set()
    for k in own:
        name = _optim_name(model, k)
        state = saved[name]
        if name in used:
            state = {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in state.items()}
        used.add(name)
        out[k] = state
    return out
