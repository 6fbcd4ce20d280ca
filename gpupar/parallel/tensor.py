"""Tensor parallelism: each of ``tp`` ranks holds a slice of every sharded weight.

Megatron-LM's pairing (Shoeybi et al., 2019, "Megatron-LM: Training Multi-Billion
Parameter Language Models Using Model Parallelism", sec. 3): for two consecutive Linear
layers A then B, split A by output columns and B by input rows. Each rank computes
``x @ A_i`` -> activation -> ``@ B_i`` on its own slice, and one all-reduce of the partial
results after B restores the full output. The element-wise activation between them needs
no communication because each rank holds whole columns of A's output.

Written as a declarative plan ``{"module.name": ColwiseParallel() | RowwiseParallel()}``
for PyTorch's ``parallelize_module``; DTensor inserts the collectives in forward and
backward, so there is no hand-written autograd here. Layers outside the plan stay whole
on every rank: they see the same (replicated) input, so they compute identical gradients.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from gpupar.errors import UsageError

Plan = dict[str, ParallelStyle]


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: Plan | None = None) -> nn.Module:
    """Shard ``model`` over the 1-D ``tp_mesh`` by ``plan``; without one, the built-in GPT gets
    its per-block plan and any other model gets consecutive Linear pairs (``auto_plan``).

    A user plan (Python API) is a dict of module name -> ``ColwiseParallel()`` /
    ``RowwiseParallel()`` (or any ``ParallelStyle``), exactly as ``parallelize_module`` takes it.
    """
    from gpupar.gpt import GPT

    tp = tp_mesh.size()
    if plan is None:
        plan = gpt_plan(model, tp) if isinstance(model, GPT) else auto_plan(model)
    check_divisible(model, plan, tp)
    return parallelize_module(model, tp_mesh, plan)


def auto_plan(model: nn.Module) -> Plan:
    """Pair consecutive Linear children of each module: colwise, then rowwise.

    Parameter-free children (ReLU, GELU, Dropout) may sit between the two; a child with
    parameters of another kind breaks the pair. An odd Linear at the end stays whole.
    """
    plan: Plan = {}
    for prefix, parent in model.named_modules():
        pending: str | None = None
        for name, child in parent.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear):
                if pending is None:
                    pending = full
                else:
                    plan[pending], plan[full] = ColwiseParallel(), RowwiseParallel()
                    pending = None
            elif any(True for _ in child.parameters()):
                pending = None
    if not plan:
        raise UsageError(f"--tp: {type(model).__name__} has no two consecutive nn.Linear layers to shard; "
                         "pass a plan through the Python API (gpupar.parallel.tensor.apply_tp(model, mesh, plan))")
    return plan


def gpt_plan(model: nn.Module, tp: int) -> Plan:
    """Per block: attention q/k/v colwise (whole heads per rank), its output rowwise; the MLP's
    up projection colwise and its down projection rowwise. Two all-reduces per block forward.
    Embeddings, norms and the vocabulary head stay whole (sequence parallel is not used)."""
    if model.heads % tp:
        raise UsageError(f"--tp {tp} must divide --heads {model.heads}: each rank holds whole attention heads")
    plan: Plan = {}
    for i in model.blocks:
        for name in ("attn.q", "attn.k", "attn.v", "mlp.up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.out", "mlp.down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    return plan


def check_divisible(model: nn.Module, plan: Plan, tp: int) -> None:
    """A colwise layer's output width and a rowwise layer's input width must divide by tp."""
    for name, style in plan.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        if isinstance(style, ColwiseParallel) and layer.out_features % tp:
            raise UsageError(f"--tp {tp} does not divide the {layer.out_features} output features of {name!r} "
                             "(sharded by columns); choose a --hidden that tp divides")
        if isinstance(style, RowwiseParallel) and layer.in_features % tp:
            raise UsageError(f"--tp {tp} does not divide the {layer.in_features} input features of {name!r} "
                             "(sharded by rows); choose a --hidden that tp divides")
