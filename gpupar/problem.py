"""A problem: the data and a freshly initialised model for one config, with the model's spec.

The launcher builds it on the meta device for the checks before launch (``job.preflight``),
and every rank builds it for real; train, verify, bench, plan and sweep all load it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpupar.config import Config
from gpupar.data import load_file, prepare_targets, synthetic_regression
from gpupar.errors import UsageError
from gpupar.models import ModelSpec, build_model, check_shapes, model_spec


@dataclass
class Problem:
    """The data, a freshly initialised (not yet placed) model for one config, and its spec."""

    X: torch.Tensor
    y: torch.Tensor
    model: nn.Module
    spec: ModelSpec


def load_problem(cfg: Config, meta: bool = False) -> Problem:
    """Load or synthesise the data, then build the model with an input width that follows it.

    ``meta``: build the model on the meta device where it can (shapes, no memory, no compute),
    for the checks before launch; a model that cannot be built or run there is built on the CPU.
    """
    d, spec = cfg.data, model_spec(cfg.model)
    if d.data is None and spec.synthetic_data is not None:  # the model's own task (the GPT's tokens)
        X, y = spec.synthetic_data(d.samples, cfg.train.seed)
        return Problem(X, y, _build(cfg, spec, 0, 0, meta), spec)
    if d.data is None:
        X, y = synthetic_regression(d.samples, d.features, d.noise, cfg.train.seed)
        if d.task == "classification":
            y = (y > y.median()).long()  # a learnable two-class version of the classic target
    else:
        X, y = load_file(d.data, d.target)
    y = prepare_targets(y, d.task)
    out_features = int(y.max()) + 1 if d.task == "classification" else y.shape[1]
    model = _build(cfg, spec, X.shape[1], out_features, meta)
    try:
        check_shapes(model, X.to(device_of(model)), y, d.task)
    except NotImplementedError:  # an op without a meta kernel: probe a real model instead
        model = _build(cfg, spec, X.shape[1], out_features, meta=False)
        check_shapes(model, X, y, d.task)
    return Problem(X, y, model, spec)


def _build(cfg: Config, spec: ModelSpec, n_in: int, n_out: int, meta: bool) -> nn.Module:
    if meta:
        try:
            with torch.device("meta"):
                return build_model(cfg.model, n_in, n_out, cfg.train.seed)
        except UsageError:
            raise
        except Exception:  # a factory that needs real tensors (loads a file, reads values)
            pass
    return build_model(cfg.model, n_in, n_out, cfg.train.seed)


def device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
