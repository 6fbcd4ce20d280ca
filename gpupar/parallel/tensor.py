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
from gpupar.parallel.tied import check_tp, retie, tied_parameters

Plan = dict[str, ParallelStyle]


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> nn.Module:
    """Shard ``model`` over the 1-D ``tp_mesh`` by ``plan``: a dict of module name ->
    ``ColwiseParallel()`` / ``RowwiseParallel()`` (or any ``ParallelStyle``), exactly as
    ``parallelize_module`` takes it. The model's spec gives the plan (``auto_plan`` by default)."""
    check_tp_divisible(model, plan, tp_mesh.size())
    check_tp(model, plan)
    ties = tied_parameters(model)
    parallelize_module(model, tp_mesh, plan)
    retie(model, ties)  # parallelize_module sharded each module's copy of a tied Parameter apart
    return model


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


def check_tp_divisible(model: nn.Module, plan: Plan, tp: int) -> None:
    """A colwise layer's output width and a rowwise layer's input width must divide by tp."""
    for name, style in plan.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        if isinstance(style, ColwiseParallel) and layer.out_features % tp:
            raise UsageError(f"--tp {tp} does not divide the {layer.out_features} output features of {name!r} "
                             f"(sharded by columns); choose a --hidden that tp divides ({_divisors(layer.out_features)})")
        if isinstance(style, RowwiseParallel) and layer.in_features % tp:
            raise UsageError(f"--tp {tp} does not divide the {layer.in_features} input features of {name!r} "
                             f"(sharded by rows); choose a --hidden that tp divides ({_divisors(layer.in_features)})")


def _divisors(width: int) -> str:
    return "--tp " + ", ".join(str(d) for d in range(2, min(width, 64) + 1) if width % d == 0) + " divide it"
