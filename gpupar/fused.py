"""M models of one shape as one program: stacked parameters, one forward and backward, one Adam.

The idea is HFTA's (Wang et al., "Horizontally Fused Training Array", MLSys 2021): the
trainable parameters of M same-shaped models live in one 1-D tensor ``flat [T]``; one
backward produces all M gradients in ``flat.grad``, and one vectorised optimizer step
updates all of them, each element with the learning rate of its own model
(``model_of [T]`` says which model an element belongs to).

Exactness: the models never mix. The summed loss ``sum_m loss_m`` has
``d/d theta_m = d loss_m / d theta_m``, and Adam is elementwise, so every model follows
the arithmetic of training it alone; only the rounding of batched instead of single
matrix products differs (tested to 1e-5 relative on the losses).

Three ways to run the forward and backward, fastest first:

* ``linear``: the built-in Linear/ReLU chains (simple-nn, mlp), by hand. A 2-core CPU is
  memory-bound here, not compute-bound, so the layout is chosen to avoid copies and
  passes over memory: the first layer reads the same input for every model and is ONE
  matrix product ``x [n, in] @ W1ᵀ [in, M*H]``; samples go through in tiles of about a
  megabyte of activations so they stay in cache; the backward is written out (no
  autograd graph), with the loss's own gradient the only autograd call.
* ``vmap``: any other model through ``torch.func.functional_call`` under ``vmap``.
* ``loop``: a model that vmap refuses (in-place buffer updates, data-dependent control
  flow) runs its M copies one after another inside each step: still one optimizer, only
  slower. ``check_vmappable`` says so when it falls back.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gpupar.config import Config
from gpupar.models import SimpleNN

TILE_BYTES = 1 << 20  # activations per sample tile in the 'linear' path: about one L2 cache


@dataclass
class Block:
    """Where one parameter of all M models lives in ``flat``.

    ``shape`` is the fused shape, with the model dimension at ``model_axis``; ``transposed``
    says that each model's slice is the transpose of its ``nn.Module`` parameter (the
    Linear weights of the 'linear' path are stored as Wᵀ, ready for the matrix products).
    """

    offset: int
    shape: tuple[int, ...]
    model_axis: int = 0
    transposed: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Fused:
    base: nn.Module  # one of the models: its structure, for functional_call and for export
    flat: torch.Tensor  # [T] every trainable parameter of every model
    model_of: torch.Tensor  # [T] int64, the model each element belongs to
    blocks: dict[str, Block]
    fixed: dict[str, torch.Tensor]  # buffers and frozen parameters, each [M, ...]
    kind: str  # 'linear', 'vmap' or 'loop'
    M: int
    chain: list[str] = field(default_factory=list)  # 'linear:NAME' / 'relu', for kind 'linear'

    def view(self, name: str, source: torch.Tensor | None = None) -> torch.Tensor:
        b = self.blocks[name]
        return (self.flat if source is None else source)[b.offset:b.offset + b.numel].view(b.shape)

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Model m as a normal single model's state dict (names and order as ``base.state_dict()``)."""
        own = {k: v[m] for k, v in self.fixed.items()}
        for name, b in self.blocks.items():
            t = self.view(name).select(b.model_axis, m)
            own[name] = t.t() if b.transposed else t
        return {k: own[k].detach().clone().contiguous() for k in self.base.state_dict()}


def linear_chain(model: nn.Module) -> list[str] | None:
    """['linear:fc1', 'relu', 'linear:fc2'] for a plain chain of Linear and ReLU, else None."""
    if type(model) is SimpleNN:
        named = [("fc1", model.fc1), ("relu", model.relu), ("fc2", model.fc2)]
    elif type(model) is nn.Sequential:
        named = list(model.named_children())
    else:
        return None
    chain = []
    for name, layer in named:
        if type(layer) is nn.Linear and layer.bias is not None:
            chain.append(f"linear:{name}")
        elif type(layer) is nn.ReLU:
            chain.append("relu")
        else:
            return None
    return chain if chain and chain[0].startswith("linear:") else None


def fuse(models: list[nn.Module], device: torch.device, allow_linear: bool = True) -> Fused:
    """Stack M models of identical structure into one Fused (copies; the models are untouched)."""
    base = copy.deepcopy(models[0]).to(device)
    M = len(models)
    chain = linear_chain(base) if allow_linear else None
    first = chain[0].split(":", 1)[1] if chain else None
    blocks: dict[str, Block] = {}
    pieces, owners, offset = [], [], 0
    for name, p in base.named_parameters():
        if not p.requires_grad:
            continue
        per_model = [m.get_parameter(name).detach() for m in models]
        if chain and name.endswith(".weight"):
            # Wᵀ per model; the first layer as [in, M, out] so that it is one [in, M*out] matrix.
            axis = 1 if name == f"{first}.weight" else 0
            stacked, transposed = torch.stack([w.t() for w in per_model], dim=axis), True
        else:
            axis, stacked, transposed = 0, torch.stack(per_model), False
        blocks[name] = Block(offset, tuple(stacked.shape), axis, transposed)
        shape = [1] * stacked.dim()
        shape[axis] = M
        owners.append(torch.arange(M).view(shape).expand(stacked.shape).reshape(-1))
        pieces.append(stacked.reshape(-1))
        offset += stacked.numel()
    flat = torch.cat(pieces).to(device).requires_grad_(True)
    fixed = {}
    trainable = set(blocks)
    for name, _ in list(base.named_parameters()) + list(base.named_buffers()):
        if name not in trainable:
            get = (lambda m, n=name: m.get_parameter(n)) if name in dict(base.named_parameters()) else \
                (lambda m, n=name: m.get_buffer(n))
            fixed[name] = torch.stack([get(m).detach() for m in models]).to(device)
    return Fused(base, flat, torch.cat(owners).to(device), blocks, fixed, "linear" if chain else "vmap", M,
                 chain or [])


def check_vmappable(f: Fused, x: torch.Tensor, log: Callable[[str], None]) -> None:
    """Use vmap only where it is exact; otherwise fall back to 'loop' and say why.

    Buffers (BatchNorm's running statistics, counters) are updated in place during
    training; under vmap those updates are not the ones the model alone makes (measured:
    BatchNorm's running mean drifts by ~1e-3), so a model with buffers runs as a loop.
    Anything else vmap refuses shows up in a probe on two samples (with copies of the buffers).
    """
    if f.kind != "vmap":
        return
    reason = None
    buffers = [name for name, _ in f.base.named_buffers()]
    if buffers:
        reason = f"its buffers ({', '.join(buffers[:3])}) change in place during training"
    else:
        probe = copy.copy(f)
        probe.fixed = {k: v.clone() for k, v in f.fixed.items()}
        try:
            with torch.no_grad():
                _autograd_forward(probe, x[:2])
        except Exception as exc:  # vmap raises RuntimeError, ValueError or NotImplementedError
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if reason:
        log(f"note: {type(f.base).__name__} cannot be vmapped exactly ({reason}); its {f.M} copies run one "
            "after another in each fused step (exact, but slower)")
        f.kind = "loop"


# ----------------------------------------------------------------------------- losses

def loss_sums(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed loss of each model: out [M, n, ...], y [n, ...] -> [M]."""
    M = out.shape[0]
    if name == "cross-entropy":
        return F.cross_entropy(out.flatten(0, 1), y.repeat(M), reduction="none").view(M, -1).sum(1)
    fn = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[name]
    return fn(out, y.expand_as(out), reduction="none").flatten(1).sum(1)


def loss_divisor(name: str, n_samples: int, y: torch.Tensor) -> int:
    """What torch's 'mean' reduction divides by: samples (cross-entropy) or target elements."""
    return n_samples if name == "cross-entropy" else n_samples * math.prod(y.shape[1:])


# ----------------------------------------------------------------------------- forward + backward

def train_step(f: Fused, x: torch.Tensor, y: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Forward and backward of all M models on one batch; leaves ``f.flat.grad``; returns losses [M]."""
    divisor = loss_divisor(loss_name, len(x), y)
    if f.kind != "linear":
        losses = loss_sums(loss_name, _autograd_forward(f, x), y) / divisor
        losses.sum().backward()  # d(sum)/d(model m) = d loss_m / d model m: the models stay apart
        return losses.detach()
    grad = torch.zeros_like(f.flat)
    losses = torch.zeros(f.M, dtype=f.flat.dtype, device=f.flat.device)
    rows = _tile_rows(f, len(x))
    for start in range(0, len(x), rows):
        xt, yt = x[start:start + rows], y[start:start + rows]
        acts = _linear_forward(f, xt, keep=True)
        out = acts[-1].transpose(0, 1).detach().requires_grad_(True)  # [M, n, out]
        tile_losses = loss_sums(loss_name, out, yt) / divisor
        (g_out,) = torch.autograd.grad(tile_losses.sum(), out)
        losses += tile_losses.detach()
        _linear_backward(f, acts, g_out.transpose(0, 1), grad)
    f.flat.grad = grad
    return losses


@torch.no_grad()
def evaluate(f: Fused, x: torch.Tensor, y: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Summed loss of each model [M] on (x, y), in eval mode, without gradients."""
    f.base.eval()
    try:
        if f.kind != "linear":
            return loss_sums(loss_name, _autograd_forward(f, x), y)
        rows = _tile_rows(f, len(x))
        return sum(loss_sums(loss_name, _linear_forward(f, x[s:s + rows])[-1].transpose(0, 1), y[s:s + rows])
                   for s in range(0, len(x), rows))
    finally:
        f.base.train()


def _tile_rows(f: Fused, n: int) -> int:
    widest = max(b.shape[-1] for b in f.blocks.values() if b.transposed)  # the widest layer output
    return max(16, min(n, TILE_BYTES // (4 * f.M * widest)))


def _linear_forward(f: Fused, x: torch.Tensor, keep: bool = False) -> list[torch.Tensor]:
    """Activations [n, M, width] after each Linear/ReLU (only the last unless ``keep``)."""
    acts: list[torch.Tensor] = [x]
    h = None
    for step in f.chain:
        if step == "relu":
            h = torch.relu(h)
        else:
            name = step.split(":", 1)[1]
            Wt, b = f.view(f"{name}.weight").detach(), f.view(f"{name}.bias").detach()
            if h is None:  # shared input: [n, in] @ [in, M*out] for all models at once
                inp, M, out = Wt.shape
                h = torch.addmm(b.reshape(M * out), x, Wt.reshape(inp, M * out)).view(len(x), M, out)
            elif Wt.shape[2] == 1:  # one output per model: a dot product per (sample, model)
                h = (torch.linalg.vecdot(h, Wt[:, :, 0]) + b[:, 0]).unsqueeze(2)  # [n, M, 1]
            else:  # [M, n, in] @ [M, in, out]
                h = torch.baddbmm(b.unsqueeze(1), h.transpose(0, 1), Wt).transpose(0, 1)  # [n, M, out]
        acts.append(h) if keep else None
    return acts if keep else [h]


def _linear_backward(f: Fused, acts: list[torch.Tensor], g: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate g [n, M, out] through the chain, adding each parameter's gradient into ``grad``."""
    x = acts[0]
    for k in range(len(f.chain) - 1, -1, -1):
        step, h_in, h_out = f.chain[k], acts[k], acts[k + 1]
        if step == "relu":
            g = torch.ops.aten.threshold_backward(g, h_out, 0)  # zero where the ReLU output was 0
            continue
        name = step.split(":", 1)[1]
        Wt = f.view(f"{name}.weight").detach()
        f.view(f"{name}.bias", grad).add_(g.sum(0))  # [M, out]
        if k == 0:
            inp, M, out = Wt.shape
            f.view(f"{name}.weight", grad).view(inp, M * out).addmm_(x.t(), g.reshape(len(x), M * out))
            return  # no gradient for the data
        if Wt.shape[2] == 1:
            f.view(f"{name}.weight", grad)[:, :, 0].add_((g * h_in).sum(0))  # [M, in]
            g = g * Wt[:, :, 0]  # [n, M, in]
        else:
            f.view(f"{name}.weight", grad).baddbmm_(h_in.permute(1, 2, 0), g.transpose(0, 1))  # [M, in, out]
            g = torch.bmm(g.transpose(0, 1), Wt.transpose(1, 2)).transpose(0, 1)  # [n, M, in]


def _autograd_forward(f: Fused, x: torch.Tensor) -> torch.Tensor:
    """vmap or loop forward: x [n, ...] -> [M, n, ...], differentiable into ``f.flat``."""
    params = {name: f.view(name) for name in f.blocks}  # [M, *shape] each (model_axis 0 here)
    if f.kind == "vmap":
        def one(p, fixed, x):
            return torch.func.functional_call(f.base, (p, fixed), (x,))
        return torch.func.vmap(one, in_dims=(0, 0, None))(params, f.fixed, x)
    return torch.stack([torch.func.functional_call(f.base, ({k: v[m] for k, v in params.items()},
                                                            {k: v[m] for k, v in f.fixed.items()}), (x,))
                        for m in range(f.M)])


# ----------------------------------------------------------------------------- optimizer

class FusedOptimizer:
    """Adam, AdamW or SGD over ``flat [T]`` with each element's own model's learning rate.

    The arithmetic is torch.optim's single-tensor path line for line, with the scalar lr
    replaced by a per-element tensor: step sizes are computed in float64, as Python floats
    are, then rounded to the parameter dtype, as the scalar kernels do.
    """

    def __init__(self, f: Fused, lrs: list[float], cfg: Config):
        o = cfg.optim
        self.flat, self.model_of, self.kind, self.wd = f.flat, f.model_of, o.optimizer, o.weight_decay
        self.base_lr = torch.tensor(lrs, dtype=torch.float64, device=f.flat.device)  # [M]
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
        self.exp_avg = torch.zeros_like(f.flat)
        self.exp_avg_sq = torch.zeros_like(f.flat)
        self.step_count = 0

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        param, grad, dtype = self.flat, self.flat.grad, self.flat.dtype
        lr = self.base_lr * lr_factor  # [M] float64, as LambdaLR's base_lr * factor
        if self.kind == "sgd":
            if self.wd:
                grad = grad.add(param, alpha=self.wd)
            param.addcmul_(grad, lr.to(dtype)[self.model_of], value=-1)
            return
        self.step_count += 1
        if self.wd and self.kind == "adamw":
            param.mul_((1 - lr * self.wd).to(dtype)[self.model_of])
        elif self.wd:
            grad = grad.add(param, alpha=self.wd)
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1 ** self.step_count
        bias_correction2_sqrt = (1 - self.beta2 ** self.step_count) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        neg_step_size = (-(lr / bias_correction1)).to(dtype)[self.model_of]  # [T]
        param.add_(neg_step_size * self.exp_avg / denom)  # = addcdiv_(exp_avg, denom, value=-step_size)

    def zero_grad(self) -> None:
        self.flat.grad = None


@torch.no_grad()
def clip_per_model(f: Fused, max_norm: float) -> None:
    """clip_grad_norm_ for each model: the norm over all of its parameters' gradients."""
    grad = f.flat.grad
    sq = torch.zeros(f.M, dtype=torch.float64, device=grad.device).index_add_(0, f.model_of, grad.double() ** 2)
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0).to(grad.dtype)  # [M]
    grad.mul_(coef[f.model_of])
