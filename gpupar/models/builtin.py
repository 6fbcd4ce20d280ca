"""Built-in models (the classic SimpleNN and an MLP), user factories by import path, and the
spec of the model that --model names."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from gpupar.config import ModelConfig
from gpupar.errors import UsageError, first_line
from gpupar.models.gpt import gpt_spec
from gpupar.models.hf import hf_spec, is_hf
from gpupar.models.outputs import check_differentiable, first_output, own_loss
from gpupar.models.spec import ModelSpec

BUILTIN = ("simple-nn", "mlp", "gpt")


class SimpleNN(nn.Module):
    """The classic example: Linear(in, 50) -> ReLU -> Linear(50, out)."""

    def __init__(self, in_features: int = 10, hidden: int = 50, out_features: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, in] -> [batch, out]
        return self.fc2(self.relu(self.fc1(x)))


def mlp(in_features: int, hidden: int, layers: int, out_features: int) -> nn.Sequential:
    """``layers`` Linear layers with ReLU between them, as a flat Sequential (easy to split and shard)."""
    if layers < 2:
        raise UsageError(f"--layers {layers}: an mlp needs at least 2 Linear layers")
    widths = [in_features] + [hidden] * (layers - 1) + [out_features]
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(widths[i], widths[i + 1]))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def hidden_width(cfg: ModelConfig) -> int:
    """--hidden, or the model's own default: 50 (the classic SimpleNN, and mlp) or 64 (gpt)."""
    return cfg.hidden or (64 if cfg.name == "gpt" else 50)


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The spec of the model named by --model."""
    hidden = hidden_width(cfg)
    if cfg.name == "simple-nn":
        return ModelSpec("simple-nn", lambda n_in, n_out: SimpleNN(n_in, hidden, n_out))
    if cfg.name == "mlp":
        return ModelSpec("mlp", lambda n_in, n_out: mlp(n_in, hidden, cfg.layers, n_out))
    if cfg.name == "gpt":
        return gpt_spec(cfg, hidden)
    if is_hf(cfg.name):
        return hf_spec(cfg)
    if ":" in cfg.name:
        factory = load_factory(cfg.name)
        return ModelSpec(cfg.name, lambda n_in, n_out: factory())
    raise UsageError(f"--model {cfg.name!r} is not one of: {', '.join(BUILTIN)}, hf:TYPE, hf:DIR, "
                     "or package.module:factory")


def build_model(cfg: ModelConfig, in_features: int, out_features: int, seed: int) -> nn.Module:
    """Build the model named by --model; the built-ins take their input width from the data.

    Weights are initialised under ``torch.manual_seed(seed)`` so every rank and the
    single-device reference start from the same parameters.
    """
    torch.manual_seed(seed)
    try:
        return model_spec(cfg).build(in_features, out_features)
    except (MemoryError, RuntimeError) as exc:  # a width whose parameters do not fit: one line, not the allocator's trace
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise UsageError(f"--model {cfg.name} (--hidden {hidden_width(cfg)}, --layers {cfg.layers}): its parameters "
                         f"cannot be allocated on this machine ({first_line(exc)[:160]}); pick a smaller width") from None


def import_callable(path: str, flag: str = "--model", what: str = "factory"):
    """Resolve 'package.module:name' to a callable, or one line naming what is wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{flag} {path!r}: expected the form package.module:{what}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{flag} {path!r}: cannot import module {module_name!r} ({first_line(exc)})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UsageError(f"{flag} {path!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def load_factory(path: str):
    """Resolve 'package.module:factory' to a callable returning an nn.Module."""
    factory, attr = import_callable(path), path.partition(":")[2]
    try:
        required = [p.name for p in inspect.signature(factory).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # no signature to read (some builtins): calling it will tell
        required = []
    if required:
        raise UsageError(f"--model {path!r}: {attr}() needs arguments ({', '.join(required)}); gpupar calls the "
                         "factory with none, so give them defaults or wrap it in a function without arguments")

    def build() -> nn.Module:
        try:
            model = factory()
        except (Exception, SystemExit) as exc:  # the user's code failed (or exited: sys:exit trained nothing, exit 0)
            first = first_line(exc, "")
            raise UsageError(f"--model {path!r}: the factory {attr}() raised {type(exc).__name__}"
                             + (f": {first}" if first else "")) from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {path!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
        return model

    build.__doc__ = inspect.getdoc(factory)
    return build


def check_shapes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> None:
    """Run two samples through the model so a shape mismatch is a clear error, not a deep traceback.

    The probe has no side effects: eval mode (BatchNorm uses, and does not update, its running
    statistics; dropout draws nothing), no backward (autograd is on only to see that the output
    carries a gradient: ``check_differentiable``), and the RNG state and every buffer are put
    back, so the training that follows is the one it would have been without the probe.
    """
    out = probe_forward(model, x)
    check_differentiable(out, model)
    if own_loss(out) is not None:
        return  # the model computes its loss (a Hugging Face model given labels): no target to match
    out = first_output(out)
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"model returned {type(out).__name__} without a tensor of predictions in it (a tensor, "
                         "a tuple whose first element is one, a dict or ModelOutput with logits or a loss)")
    if task == "regression" and out.shape[1:] != y.shape[1:]:
        raise UsageError(f"model output shape {list(out.shape[1:])} does not match target shape "
                         f"{list(y.shape[1:])} per sample")
    if task == "classification" and (out.dim() != 2 or int(y.max()) >= out.shape[1]):
        raise UsageError(f"classification needs model output [batch, classes] covering labels 0..{int(y.max())}, "
                         f"got {list(out.shape)}")


def probe_forward(model: nn.Module, x: torch.Tensor):
    """The model's output on the first two rows of ``x``, leaving no trace (see check_shapes).
    A forward that fails is a UsageError; on the meta device, a NotImplementedError (the caller
    probes a real model)."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    try:
        model.eval()
        with torch.enable_grad():  # under a caller's no_grad too: the output's grad_fn is the check
            out = model(x[:2])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if x.device.type == "meta":  # an op without a meta kernel, or one that reads values
            raise NotImplementedError(str(exc)) from None  # (Tensor.item()): the caller probes a real model
        raise UsageError(f"model does not accept input of shape {list(x.shape[1:])} per sample "
                         f"({type(exc).__name__}: {first_line(exc, '')})") from None
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return out


EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def needs_float_features(model: nn.Module, forward) -> bool | None:
    """Whether the model needs integer features cast to floats, from ``forward()`` (a probe on
    them): True when it fails; False when it succeeds and no integer tensor reaches a layer of
    float weights other than an embedding (the model takes ids as they are); None when it
    succeeds but one does (a Linear): on the meta device a Linear takes int64 without a word,
    so the hooks tell there, and a probe of the cast features decides."""
    fed: list[str] = []

    def hook(module, args):
        if not isinstance(module, EMBEDDINGS) and next(module.children(), None) is None \
                and any(p.is_floating_point() for p in module.parameters(recurse=False)) \
                and any(isinstance(a, torch.Tensor) and not (a.is_floating_point() or a.is_complex()) for a in args):
            fed.append(type(module).__name__)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        forward()
    except UsageError:
        return True
    finally:
        for handle in handles:
            handle.remove()
    return None if fed else False


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype integer features are cast to: the model's first floating-point parameter's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
