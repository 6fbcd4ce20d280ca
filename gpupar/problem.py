"""A problem: the data and a freshly initialised model for one config, with the model's spec.

The launcher builds it on the meta device for the checks before launch (``job.preflight``),
and every rank builds it for real; train, verify, bench, plan and sweep all load it here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from gpupar.config import Config
from gpupar.data import first_samples, load_data, prepare_targets, synthetic_regression
from gpupar.data.tokens import TokenWindows, check_vocab
from gpupar.errors import UsageError
from gpupar.models import ModelSpec, build_model, check_shapes, model_spec
from gpupar.models.builtin import float_dtype, needs_float_features, probe_forward
from gpupar.models.hf import hf_config, is_hf
from gpupar.training.step import split_batch


@dataclass
class Problem:
    """The data, a freshly initialised (not yet placed) model for one config, and its spec.

    Tensor data is ``X, y`` whole. A Dataset, stream or DataLoader (``--data module:factory``,
    a token file) is ``source``, never read whole: ``X, y`` are then its first two samples'
    input and target, to probe the model with.
    """

    X: torch.Tensor
    y: torch.Tensor | None
    model: nn.Module
    spec: ModelSpec
    source: Any = None  # what as_samples takes when it is not (X, y)

    @property
    def data(self):
        """What ``gpupar.data.as_samples`` takes."""
        return (self.X, self.y) if self.source is None else self.source

    @property
    def samples(self) -> int | None:
        """Samples before the validation split; None for a stream without ``len``."""
        if self.source is None:
            return len(self.X)
        return _source_samples(self.source)


def load_problem(cfg: Config, meta: bool = False) -> Problem:
    """Load or synthesise the data, then build the model with an input width that follows it.

    ``meta``: for the checks before launch, a model above ``PROBE_ON_META_BYTES`` stays on the
    meta device where it can (shapes, no memory, no compute); a small one, or one that cannot be
    built or run there, is built on the CPU.
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
        data = load_data(cfg)
        if not isinstance(data, tuple):
            return _source_problem(cfg, spec, data, meta)
        X, y = data
    y = prepare_targets(y, d.task)
    out_features = int(y.max()) + 1 if d.task == "classification" else y.shape[1]
    model = _build(cfg, spec, X.shape[1], out_features, meta)

    def check(features: torch.Tensor) -> nn.Module:
        try:
            check_shapes(model, features.to(device_of(model)), y, d.task)
            return model
        except NotImplementedError:  # an op without a meta kernel: probe a real model instead
            real = _build(cfg, spec, X.shape[1], out_features, meta=False)
            check_shapes(real, features, y, d.task)
            return real

    if X.is_floating_point():
        return Problem(X, y, check(X), spec)
    X, model, note = integer_features(X, model, check)
    if note is not None:
        note_once(f"--data {d.data}: {note}" if d.data else note)
    return Problem(X, y, model, spec)


def integer_features(X: torch.Tensor, model: nn.Module, check: Callable[[torch.Tensor], Any]):
    """Integer features (an .npz of counts, a .pt of int64, the API's tensors) go to the model
    as they are where it takes them (an embedding of ids); else they are cast to its float
    dtype, with a note. They were refused after the model was built, naming a dtype clash.

    ``check(features)`` probes the model on them (a UsageError when it cannot take them).
    Returns (the features, what ``check`` returned, the note or None).
    """
    first: list = []
    verdict = needs_float_features(model, lambda: first.append(check(X)))
    if verdict is False:
        return X, first[0], None
    dtype = float_dtype(model)
    cast = X.to(dtype)
    try:
        checked = check(cast)
    except UsageError:
        if verdict is None:  # ids passed and floats did not: a layer of its own that indexes by them
            return X, first[0], None
        raise
    names = [str(t).removeprefix("torch.") for t in (X.dtype, dtype)]
    return cast, checked, f"integer features ({names[0]}) cast to {names[1]}, the dtype of the model's weights"


_NOTED: set[str] = set()
"""Notes already printed by this process: the launcher's checks and the run it then runs here
load the same problem twice; a rank of a launched job leaves notes to its launcher."""


def note_once(line: str) -> None:
    if line in _NOTED or ("RANK" in os.environ and "LOCAL_RANK" in os.environ):
        return
    _NOTED.add(line)
    print(f"gpupar: note: {line}", file=sys.stderr, flush=True)


def _source_problem(cfg: Config, spec: ModelSpec, source, meta: bool) -> Problem:
    """A Dataset, stream or DataLoader: the model is probed with its first two samples."""
    if isinstance(source, TokenWindows) and meta:  # before launch: read once
        if cfg.model.name == "gpt":
            check_vocab(source, cfg.model.vocab)
        elif is_hf(cfg.model.name):
            check_vocab(source, hf_config(cfg.model).vocab_size, "--hf-config vocab_size={}")
    args, _, y = split_batch(first_samples(source))
    X = args[0] if args and isinstance(args[0], torch.Tensor) else None
    n_in = X.shape[1] if X is not None and X.dim() > 1 else 0
    n_out = 0
    if isinstance(y, torch.Tensor) and spec.loss is None:  # the model's own loss knows its target
        n_out = int(y.max()) + 1 if cfg.data.task == "classification" else (y.shape[1] if y.dim() > 1 else 1)
    model = _build(cfg, spec, n_in, n_out, meta)
    if X is not None and not (X.is_floating_point() or X.is_complex()) and not isinstance(source, TokenWindows):
        _refuse_integer_features(cfg, X, model)
    if X is not None and isinstance(y, torch.Tensor) and spec.loss is None and X.is_floating_point():
        # The target as collated (a scalar per sample stays [batch]: against a [batch, 1]
        # output, MSE would broadcast to [batch, batch] without a word).
        target = y.reshape(-1).long() if cfg.data.task == "classification" else y
        try:
            check_shapes(model, X.to(device_of(model)), target, cfg.data.task)
        except NotImplementedError:
            model = _build(cfg, spec, n_in, n_out, meta=False)
            check_shapes(model, X, target, cfg.data.task)
    return Problem(X, y, model, spec, source)


def _refuse_integer_features(cfg: Config, X: torch.Tensor, model: nn.Module) -> None:
    """A table or Dataset is read a batch at a time, so integer features a model cannot take
    (a Linear) are refused before launch, not cast: they were a traceback at the first step.
    Ids for an embedding pass (a token file is ids by design and is not asked)."""
    def forward(x: torch.Tensor):
        try:
            return probe_forward(model, x.to(device_of(model)))
        except NotImplementedError:  # no meta kernel: the ranks' first step will tell
            return None

    if integer_features(X, model, forward)[2] is not None:
        raise UsageError(f"--data {cfg.data.data}: the features are {str(X.dtype).removeprefix('torch.')} and the "
                         f"model takes {str(float_dtype(model)).removeprefix('torch.')} (an integer reaches a layer "
                         "of float weights); cast them to float in the data (a datasets table: cast_column), or give "
                         "a model that embeds ids")


def _source_samples(source) -> int | None:
    from torch.utils.data import DataLoader

    dataset = source.dataset if isinstance(source, DataLoader) else source
    try:
        return len(dataset)
    except (TypeError, NotImplementedError):
        return None


PROBE_ON_META_BYTES = 64 << 20
"""Models above this size are probed on the meta device; smaller ones are built for real.
A forward on meta runs torch's Python decompositions, whose first call imports torch._dynamo
(1-2 s of CPU in every process that probes), while a small model costs less to build."""


def _build(cfg: Config, spec: ModelSpec, n_in: int, n_out: int, meta: bool) -> nn.Module:
    if meta:
        try:
            with torch.device("meta"):
                model = build_model(cfg.model, n_in, n_out, cfg.train.seed)
        except UsageError:
            raise
        except Exception:  # a factory that needs real tensors (loads a file, reads values)
            model = None
        if model is not None and _bytes(model) > PROBE_ON_META_BYTES:
            return model
    return build_model(cfg.model, n_in, n_out, cfg.train.seed)


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
