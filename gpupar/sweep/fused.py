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

* ``linear``: the built-in Linear/ReLU chains (simple-nn, mlp), by hand. On a 2-core CPU
  the two narrow first-layer products (in+1 = 11) run near the sgemm rate; the rest of the
  step is passes over the activations, which the layout keeps few: activations are
  feature-major ``[M, width, r]`` (each model's slice a row-major matrix for ``bmm``); the
  first layer is ONE product ``[M*H, in+1] @ [in+1, r]`` for all models, its bias folded
  in as a row of ones (so the bias gradient comes out of the weight-gradient product);
  ReLU runs in place; samples go in tiles of about a megabyte (L2) through reused
  buffers; the backward is written out (MSE's gradient by hand, other losses by autograd
  on the small output only). A Linear with one output sends back an outer product
  ``g ⊗ w``, carried as (g broadcast, scale w) through the ReLU, which commutes with it.
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
from gpupar.errors import first_line
from gpupar.models import SimpleNN

TILE_BYTES = 1 << 20  # activations per sample tile in the 'linear' path: about one L2 cache


@dataclass
class ParamSlot:
    """Where one parameter of all M models lives in ``flat``: ``shape`` is ``[M, *its shape]``.

    Every path stores a parameter as ``nn.Module`` does (a Linear weight as [out, in]), so
    model m's slice is its own parameter, unchanged.
    """

    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Fused:
    base: nn.Module  # one of the models: its structure, for functional_call and for export
    flat: torch.Tensor  # [T] every trainable parameter of every model
    model_of: torch.Tensor  # [T] int64, the model each element belongs to
    blocks: dict[str, ParamSlot]
    fixed: dict[str, torch.Tensor]  # buffers and frozen parameters, each [M, ...]
    kind: str  # 'linear', 'vmap' or 'loop'
    M: int
    chain: list[str] = field(default_factory=list)  # 'linear:NAME' / 'relu', for kind 'linear'
    scratch: dict = field(default_factory=dict, repr=False)  # the 'linear' path's reused activation buffers

    def view(self, name: str, source: torch.Tensor | None = None) -> torch.Tensor:
        b = self.blocks[name]
        return (self.flat if source is None else source)[b.offset:b.offset + b.numel].view(b.shape)

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Model m as a normal single model's state dict (names and order as ``base.state_dict()``)."""
        own = {k: v[m] for k, v in self.fixed.items()}
        own.update({name: self.view(name)[m] for name in self.blocks})
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
    chain = linear_chain(base) if allow_linear and all(p.requires_grad for p in base.parameters()) else None
    blocks: dict[str, ParamSlot] = {}
    pieces, owners, offset = [], [], 0
    for name, p in base.named_parameters():
        if not p.requires_grad:
            continue
        stacked = torch.stack([m.get_parameter(name).detach() for m in models])  # [M, *shape]
        blocks[name] = ParamSlot(offset, tuple(stacked.shape))
        owners.append(torch.arange(M).repeat_interleave(stacked[0].numel()))
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
            reason = first_line(exc)[:160]
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
    layers, xa = _plan(f, x, grad)
    rows, scale, losses = _tile_rows(f, len(x)), None, 0
    # MSE by hand: d/d out of sum (out - y)² / divisor = 2 (out - y) / divisor, as mse_loss_backward;
    # the residuals of all tiles are kept, [M, out, n], and squared and summed once after the loop.
    resid = x.new_empty(f.M, layers[-1][1].shape[1], len(x)) if loss_name == "mse" else None
    tiles = zip(xa.split(rows, 1), y.split(rows), resid.split(rows, 2) if resid is not None else y.split(rows))
    for xt, yt, rt in tiles:  # [in+1, r], [r, out], [M, out, r]
        acts = _linear_forward(layers, xt, f.scratch, keep=True)
        if resid is not None:
            g = torch.sub(acts[-1], yt.t(), out=rt) * (2 / divisor)  # [M, out, r]
        else:
            tile_losses, g = _loss_grad(loss_name, acts[-1], yt, divisor)
            losses = losses + tile_losses
        scale = _linear_backward(layers, acts, g, f.scratch)
    W1a, b1, g_first, _ = layers[0]  # [M*H, in+1], [M, H, 1], [in+1, M*H]
    M, H = b1.shape[:2]
    if scale is not None:  # the first layer's true gradient is g_first * scale, scale [M, H, 1]
        g_first.view(-1, M, H).mul_(scale.view(M, H))
    name = f.chain[0].split(":", 1)[1]
    f.view(f"{name}.weight", grad).copy_(g_first[:-1].t().view(M, H, -1))  # [M, H, in]
    f.view(f"{name}.bias", grad).copy_(g_first[-1].view(M, H))
    f.flat.grad = grad
    return (resid * resid).sum((1, 2)) / divisor if resid is not None else losses


@torch.no_grad()
def evaluate(f: Fused, x: torch.Tensor, y: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Summed loss of each model [M] on (x, y), in eval mode, without gradients."""
    f.base.eval()
    try:
        if f.kind != "linear":
            return loss_sums(loss_name, _autograd_forward(f, x), y)
        layers, xa = _plan(f, x)
        rows = _tile_rows(f, len(x))
        return sum(loss_sums(loss_name, _linear_forward(layers, xa[:, s:s + rows], f.scratch)[-1].transpose(1, 2),
                             y[s:s + rows]) for s in range(0, len(x), rows))
    finally:
        f.base.train()


def _tile_rows(f: Fused, n: int) -> int:
    """Samples per tile: about TILE_BYTES of the widest activation on a CPU, a multiple of 16
    (64-byte rows); all samples on a GPU, which pays per kernel launch instead."""
    if f.flat.device.type != "cpu":
        return n
    widest = max(b.shape[1] for name, b in f.blocks.items() if name.endswith(".bias"))
    return max(16, min(n, TILE_BYTES // (4 * f.M * widest) // 16 * 16))


Layer = tuple  # (W, b [M, out, 1], grad of W, grad of b), or None for a ReLU


def _plan(f: Fused, x: torch.Tensor, grad: torch.Tensor | None = None) -> tuple[list[Layer | None], torch.Tensor]:
    """Each step's tensors, looked up once per step, not per tile; the input as columns with a
    row of ones, xa [in+1, n]. The first Linear of all models is one matrix with the bias as a
    last column, W1a [M*H, in+1]: W1a @ xa = x W1ᵀ + b1 for every model in one product; its
    gradient is gathered transposed, [in+1, M*H], and written out by train_step."""
    layers: list[Layer | None] = []
    for k, step in enumerate(f.chain):
        if step == "relu":
            layers.append(None)
            continue
        name = step.split(":", 1)[1]
        W, b = f.view(f"{name}.weight").detach(), f.view(f"{name}.bias").detach()  # [M, out, in], [M, out]
        gW, gb = (None, None) if grad is None else (f.view(f"{name}.weight", grad), f.view(f"{name}.bias", grad))
        if k == 0:
            W = torch.cat([W, b.unsqueeze(2)], 2).view(-1, W.shape[2] + 1)  # [M*H, in+1]
            gW = None if grad is None else torch.zeros(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
        layers.append((W, b.unsqueeze(2), gW, gb))
    xa = torch.cat([x.t(), torch.ones(1, len(x), dtype=x.dtype, device=x.device)])  # [in+1, n]
    return layers, xa


def _loss_grad(name: str, out: torch.Tensor, y: torch.Tensor, divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of each model [M] on a tile and its gradient wrt out [M, out, r] (same layout), by autograd."""
    out = out.transpose(1, 2).detach().requires_grad_(True)  # [M, r, out]
    losses = loss_sums(name, out, y) / divisor
    (g,) = torch.autograd.grad(losses.sum(), out)
    return losses.detach(), g.transpose(1, 2)


def _buffer(scratch: dict, key: tuple, like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``key``'s shape (its last item), reused by every tile and step: a fresh
    megabyte-sized tensor per tile cost up to ~45% of a step (measured; likely page faults)."""
    if key not in scratch:
        scratch[key] = like.new_empty(key[-1])
    return scratch[key]


def _linear_forward(layers: list[Layer | None], xa: torch.Tensor, scratch: dict,
                    keep: bool = False) -> list[torch.Tensor]:
    """Activations [M, width, r] after each Linear/ReLU (only the last unless ``keep``), in
    ``scratch`` buffers: valid until the next tile.

    ReLU runs in place: the backward needs a Linear's input and a ReLU's output, never the
    pre-activation a ReLU overwrites.
    """
    acts: list[torch.Tensor] = [xa]  # [in+1, r]
    h, r = None, xa.shape[1]
    for k, layer in enumerate(layers):
        if layer is None:
            h = h.relu_()
        else:
            M, out = layer[1].shape[:2]
            buf = _buffer(scratch, ("act", k, (M, out, r)), xa)  # [M, out, r]
            if h is None:  # shared input: [M*H, in+1] @ [in+1, r] for all models at once
                h = torch.mm(layer[0], xa, out=buf.view(M * out, r)).view(M, out, r)
            else:  # [M, out, 1] + [M, out, in] @ [M, in, r]
                h = torch.baddbmm(layer[1], layer[0], h, out=buf)
        acts.append(h) if keep else None
    return acts if keep else [h]


def _linear_backward(layers: list[Layer | None], acts: list[torch.Tensor], g: torch.Tensor,
                     scratch: dict) -> torch.Tensor | None:
    """Backpropagate g [M, out, r] through the chain, adding into each layer's gradients; the
    first layer's (transposed, [in+1, M*H]) is to be multiplied by the returned scale.

    A pending ``scale`` [M, width, 1] means the true gradient is ``g * scale``: a Linear with
    one output sends back the outer product Wᵀ g, kept as (g broadcast, Wᵀ). ReLU's mask is
    elementwise, so it commutes with the scale.
    """
    scale = None
    for k in range(len(layers) - 1, -1, -1):
        if layers[k] is None:
            out = _buffer(scratch, ("grad", k, acts[k + 1].shape), g)  # zero where the ReLU output was 0
            g = torch.ops.aten.threshold_backward.grad_input(g, acts[k + 1], 0, grad_input=out)
            continue
        W, _, gW, gb = layers[k]
        h_in = acts[k]
        if k == 0:  # [in+1, r] @ [r, M*H]: weight and (through the ones row) bias gradient at once
            gW.addmm_(h_in, g.reshape(-1, g.shape[2]).t())
            return scale
        if scale is None:
            gW.baddbmm_(g, h_in.transpose(1, 2))  # [M, out, r] @ [M, r, in]
            gb.add_(g.sum(2))
        else:
            gW.add_(torch.bmm(g, h_in.transpose(1, 2)) * scale)
            gb.add_(g.sum(2) * scale[:, :, 0])
            W = W * scale
        if W.shape[1] == 1:  # Wᵀ g is an outer product: keep g broadcast [M, in, r] and Wᵀ as the scale
            g, scale = g.expand(-1, W.shape[2], -1), W.transpose(1, 2)
        else:
            g, scale = torch.bmm(W.transpose(1, 2), g), None  # [M, in, out] @ [M, out, r]
    return scale


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
