"""What a step allocates besides the activations (``gpupar plan``): the optimizer's temporaries
and the communication buffers of each layout, derived from how torch allocates them.

Each term is the bytes alive at once at the moment that matters (the step's peak), per rank,
from the shapes of the rank's local model (plan_memory.local_model): no per-model constants.
"""

from __future__ import annotations

from torch import nn

from gpupar.config import Config
from gpupar.topology import ParallelDims


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def optimizer_fused(model: nn.Module, cfg: Config, dims: ParallelDims, tp_layers: set[str]) -> bool:
    """Whether ``loop.make_optimizer`` picks the fused kernel for this rank's parameters: asked
    for (the default), and not a mix of DTensor and plain parameters (a tensor-parallel model
    whose other layers stay whole, without FSDP, which makes every parameter a DTensor)."""
    if cfg.optim.optimizer_impl != "fused":
        return False
    if dims.tp > 1 and not dims.fsdp_enabled:
        owners = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
        if owners - tp_layers and owners & tp_layers:
            return False
    return all(p.is_floating_point() for p in model.parameters())


def optimizer_temporaries(model: nn.Module, cfg: Config, dims: ParallelDims, tp_layers: set[str],
                          device_type: str, shard: float) -> int:
    """Bytes the optimizer step allocates above its state, at its peak.

    Fused Adam/AdamW/SGD update in one kernel: nothing. Otherwise torch's default: a loop over
    tensors on the CPU (Adam's ``exp_avg_sq.sqrt() / bias_correction`` holds two tensors of
    the parameter's size at once, a third with Adam's weight decay ``grad.add(param)``; SGD
    only the latter), the foreach kernels on a GPU (the same temporaries, for every tensor of
    the group at once). ``shard`` scales a parameter to the part the rank updates (1/S under FSDP).
    """
    if optimizer_fused(model, cfg, dims, tp_layers):
        return 0
    o = cfg.optim
    per_tensor = {"adam": 2 + (o.weight_decay != 0), "adamw": 2}.get(o.optimizer, int(o.weight_decay != 0))
    sizes = [nbytes(p) * shard for p in model.parameters() if p.requires_grad] or [0]
    return int(per_tensor * (sum(sizes) if device_type == "cuda" else max(sizes)))
