"""Activation checkpointing: keep fewer activations for backward and recompute the rest.

Backward needs what forward computed. Kept whole, that is a stack of activations per
block that grows with the batch and the sequence; for large models it, not the weights,
is what runs out of memory. Checkpointing (Chen et al., 2016, "Training Deep Nets with
Sublinear Memory Cost") keeps only each block's input and re-runs the block's forward
during backward: about one extra forward (+33% compute) for activations of one block at
a time. Selective checkpointing (Korthikanti et al., 2022, "Reducing Activation
Recomputation in Large Transformer Models") keeps the outputs of the expensive ops
(matmuls, attention) and recomputes only the cheap ones (norms, activation functions,
softmax inputs), which are most of the bytes and little of the FLOPs.

As in torchtitan, this is applied per block after tensor parallel and before FSDP/DDP,
with ``torch.utils.checkpoint`` (non-reentrant) and, for ``selective``, a per-op policy
(``create_selective_checkpoint_contexts``). A block is a child with parameters of an
``nn.Sequential`` / ``ModuleList`` / ``ModuleDict`` (a transformer's blocks, an MLP's
layers); a model without such containers has its top-level children as blocks. Each block
takes a subclass of its own class whose ``forward`` checkpoints the original (FSDP2's
``fully_shard`` swaps classes the same way), so parameter names, state dicts and checkpoints
stay those of the model without checkpointing. Not a forward set on the instance: a bound
method stored on its own object is a reference cycle, and the block, its parameters and
their gradients would outlive the model until Python's cycle collector ran (an H200 measured
a second copy of a model's block parameters still allocated when the next model trained).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _expensive_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention kernels
    (whichever overloads this torch build has)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _save_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _expensive_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules checkpointed one by one (see the module docstring)."""
    blocks = [child for module in model.modules() if isinstance(module, CONTAINERS)
              for child in module.children() if any(True for _ in child.parameters())]
    # A block inside another block is covered by the outer one.
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    blocks = [b for b in blocks if id(b) not in inside]
    if not blocks:
        blocks = [c for c in model.children() if any(True for _ in c.parameters())]
    return blocks


@functools.cache
def _checkpointed_class(cls: type, mode: str) -> type:
    def forward(self, *args, **kwargs):
        original = super(checkpointed, self).forward
        if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
            return original(*args, **kwargs)
        extra = {}
        if mode == "selective":
            extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_expensive)
        return checkpoint(original, *args, use_reentrant=False, **extra, **kwargs)

    checkpointed = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
    return checkpointed


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block of ``model`` in place (``full`` or ``selective``); returns it."""
    if mode == "none":
        return model
    for block in checkpoint_blocks(model):
        block.__class__ = _checkpointed_class(type(block), mode)
    return model
