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

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gpupar.errors import UsageError, first_line
from gpupar.parallel.tied import check_tp, retie, tied_parameters

Plan = dict[str, ParallelStyle]


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> nn.Module:
    """Shard ``model`` over the 1-D ``tp_mesh`` by ``plan``: a dict of module name ->
    ``ColwiseParallel()`` / ``RowwiseParallel()`` (or any ``ParallelStyle``), exactly as
    ``parallelize_module`` takes it. The model's spec gives the plan (``auto_plan`` by default).
    Layers outside the plan stay whole, which is always correct."""
    check_tp_divisible(model, plan, tp_mesh.size())
    check_tp(model, plan)
    ties = tied_parameters(model)
    parallelize_module(model, tp_mesh, plan)
    retie(model, ties)  # parallelize_module sharded each module's copy of a tied Parameter apart
    return model


def plain_linears(stage: nn.Module, plan: Plan) -> nn.Module:
    """A traced pipeline stage with the layers that ``plan`` shards back as ``nn.Linear``.

    A stage cut from the traced forward (``pipeline.trace_stages``) keeps the model's module
    tree, but each module is an ``InterpreterModule`` running the graph that export captured,
    which torch's Colwise/RowwiseParallel do not take. A planned layer whose graph is exactly
    ``aten.linear(input, weight[, bias])`` on its own parameters computes what an ``nn.Linear``
    holding those parameters computes, so it is swapped for one (the parents' graphs call
    their children by name, so they call the new layer). Any other graph is one line. A
    stage that is not traced is returned as it is."""
    for name in plan:
        traced = stage.get_submodule(name)
        if isinstance(traced, nn.Linear) or not hasattr(traced, "graph"):
            continue
        weight, bias = _traced_linear(traced, name)
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = weight  # the stage's own parameters: no copy
        if bias is not None:
            linear.bias = bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(stage.get_submodule(parent_name) if parent_name else stage, leaf, linear)
    return stage


def _traced_linear(traced: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The (weight, bias) of a traced layer whose graph is one ``aten.linear``, else one line."""
    calls = [n for n in traced.graph.nodes if n.op in ("call_function", "call_module", "call_method")]
    params = dict(traced.named_parameters(recurse=False))
    args = calls[0].args if len(calls) == 1 and calls[0].target is torch.ops.aten.linear.default else ()
    attrs = [getattr(a, "target", None) if getattr(a, "op", None) == "get_attr" else None for a in args[1:]]
    if len(attrs) not in (1, 2) or attrs[0] != "weight" or attrs[1:] not in ([], ["bias"]) or \
            not set(params) <= {"weight", "bias"} or params["weight"].dim() != 2:
        ops = ", ".join(str(getattr(n.target, "__name__", n.target)).split(".")[0] for n in calls[:3]) or "no op"
        raise UsageError(f"--tp with --pp: the traced stage's {name!r} runs {ops}, not one linear on its own "
                         "weight, so the tensor-parallel plan cannot shard it; use --pp with dp, or build the "
                         "model as an nn.Sequential")
    return params["weight"], params.get("bias")


def auto_plan(model: nn.Module, example: torch.Tensor) -> Plan:
    """Shard Linear layers in groups that a trace of the forward proves Megatron-shaped.

    The forward runs once on ``example`` (on the meta device before launch: no values are
    computed). A group is one or more Linear layers A (colwise) whose outputs flow, through
    elementwise operations only, into one Linear B (rowwise) and nowhere else: each rank then
    holds whole columns of every A and the elementwise steps need no communication, so B's
    all-reduce restores exactly the single-device output. Llama's MLP is such a group
    (``down(silu(gate(x)) * up(x))``). A view, a reduction, a use beyond B, or a full-width
    operand breaks the group: its layers stay whole, and if no group holds the plan is refused
    with one line naming the layer and the use that broke it.
    """
    flow = _trace_flow(model, example)
    plan: Plan = {}
    for row, sources in flow.sinks_of.items():
        bad = [s for s in sources if s in flow.broken or flow.sinks[s] != {row} or s in plan or s == row]
        if row in plan or row in flow.broken_rows or bad:
            continue
        plan.update({s: _style(model.get_submodule(s), True) for s in sorted(sources, key=flow.order.index)})
        plan[row] = _style(model.get_submodule(row), False)
    if not plan:
        why = next(iter(flow.broken.items()), None)
        detail = f": layer {why[0]}'s output {why[1]}" if why else ": its forward calls no nn.Linear into another"
        raise UsageError(f"--tp: no layers of {type(model).__name__} can be sharded{detail}; pass a plan "
                         "through the Python API (gpupar.parallel.tensor.apply_tp(model, mesh, plan))")
    return plan


class _Flow(TorchDispatchMode):
    """Which Linear layers' outputs reach which, recorded op by op (aten level).

    ``labels`` maps a live tensor to the Linear layers its values come from elementwise;
    ops inside a Linear's own forward are its own business and are not followed."""

    def __init__(self):
        super().__init__()
        self.labels: dict[int, frozenset[str]] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while the trace runs
        self.sinks: dict[str, set[str]] = {}  # Linear -> the Linear layers its output reaches
        self.sinks_of: dict[str, frozenset[str]] = {}  # rowwise candidate -> its input's sources
        self.broken: dict[str, str] = {}  # Linear -> the use that breaks its sharding
        self.broken_rows: set[str] = set()
        self.order: list[str] = []
        self.inside: str | None = None

    def label(self, t) -> frozenset[str]:
        return self.labels.get(id(t), frozenset()) if isinstance(t, torch.Tensor) else frozenset()

    def mark(self, out, sources: frozenset[str]) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.labels[id(t)] = sources
                self.alive.append(t)

    def breaks(self, sources, why: str) -> None:
        for s in sources:
            self.broken.setdefault(s, why)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside is None:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            sources = frozenset().union(*(self.label(t) for t in tensors))
            if not sources:
                return out
            wide = [t for t in tensors if not self.label(t) and t.numel() > 1]
            if not (torch.Tag.pointwise in func.tags or func in _ELEMENTWISE):
                self.breaks(sources, f"is also read by {func.__name__} (not elementwise)")
            elif wide:
                self.breaks(sources, f"meets a whole tensor of shape {list(wide[0].shape)} in {func.__name__}")
            else:
                self.mark(out, sources)
        return out

    def enter(self, name: str, inputs) -> None:
        if self.inside is None:
            sources = frozenset().union(*(self.label(t) for t in tree_leaves(inputs)))
            if sources:
                if name in self.sinks_of and self.sinks_of[name] != sources:
                    self.broken_rows.add(name)  # called twice on different inputs
                self.sinks_of[name] = sources
                for s in sources:
                    self.sinks.setdefault(s, set()).add(name)
            self.inside = name

    def leave(self, name: str, output) -> None:
        if self.inside == name:
            self.inside = None
            if name not in self.order:
                self.order.append(name)
            self.mark(output, frozenset({name}))


_ELEMENTWISE = {torch.ops.aten._to_copy.default, torch.ops.aten.alias.default}  # casts (autocast), aliases


def _trace_flow(model: nn.Module, example: torch.Tensor) -> _Flow:
    """Run ``model`` once on ``example`` in eval mode (no dropout draws, no BatchNorm
    statistics updated) under a ``_Flow``; its output must not carry a sharded value."""
    flow = _Flow()
    hooks = []
    for name, layer in model.named_modules():
        if widths(layer):
            hooks.append(layer.register_forward_pre_hook(lambda m, a, n=name: flow.enter(n, a)))
            hooks.append(layer.register_forward_hook(lambda m, a, o, n=name: flow.leave(n, o)))
    was_training = model.training
    model.eval()
    try:
        try:
            with torch.no_grad(), flow:
                out = model(example)
        except Exception:
            if not example.is_meta:
                raise
            # Python that reads values (Hugging Face's mask checks) cannot run on meta; under a
            # FakeTensorMode those checks skip themselves and shapes still flow.
            from torch._subclasses.fake_tensor import FakeTensorMode

            flow = _Flow()  # the hooks read the name `flow`: they record into this one
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), flow:
                out = model(example)
    except Exception as exc:  # the user's forward on one sample: say so in one line
        raise UsageError(f"--tp: tracing {type(model).__name__}'s forward for a plan failed "
                         f"({type(exc).__name__}: {first_line(exc, '')}); pass a plan through the Python API") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    flow.breaks(frozenset().union(*(flow.label(t) for t in tree_leaves(out))), "is part of the model's output")
    return flow


def widths(layer: nn.Module) -> tuple[int, int] | None:
    """(input, output) features of a linear layer: an nn.Linear, or transformers' ``Conv1D``
    (GPT-2's projections: ``x @ W + b`` with ``W`` stored (in, out), the transpose of Linear's).
    None for any other module."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if type(layer).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def by_columns(style: ParallelStyle) -> bool | None:
    """True for a colwise style, False for a rowwise one, None for any other."""
    if isinstance(style, Conv1DParallel):
        return style.colwise
    return True if isinstance(style, ColwiseParallel) else False if isinstance(style, RowwiseParallel) else None


def _style(layer: nn.Module, colwise: bool) -> ParallelStyle:
    if isinstance(layer, nn.Linear):
        return ColwiseParallel() if colwise else RowwiseParallel()
    return Conv1DParallel(colwise)


class Conv1DParallel(ParallelStyle):
    """Megatron's colwise / rowwise split for transformers' ``Conv1D``, whose weight is stored
    (in, out): by columns it is ``Shard(1)`` of the weight and ``Shard(0)`` of the bias, by rows
    ``Shard(0)`` of the weight and a whole bias. Inputs and outputs are local tensors, as with
    torch's Colwise/RowwiseParallel, so layers between a pair see plain per-rank slices."""

    def __init__(self, colwise: bool):
        super().__init__()
        self.colwise = colwise

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        weight, bias = ([Shard(1)], [Shard(0)]) if self.colwise else ([Shard(0)], [Replicate()])

        def partition(name, layer, mesh):
            for pname, param in list(layer.named_parameters(recurse=False)):
                placement = weight if pname == "weight" else bias
                layer.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, placement),
                                                             requires_grad=param.requires_grad))

        def prepare_input(layer, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):  # colwise: every rank's whole input; rowwise: its slice of it
                x = DTensor.from_local(x, mesh, [Replicate()] if self.colwise else [Shard(-1)], run_check=False)
            return (x, *inputs[1:])

        def prepare_output(layer, output, mesh):
            placement = [Shard(-1)] if self.colwise else [Replicate()]  # rowwise: all-reduce the partial sums
            return output.redistribute(placements=placement).to_local()

        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


def check_tp_divisible(model: nn.Module, plan: Plan, tp: int) -> None:
    """A colwise layer's output width and a rowwise layer's input width must divide by tp."""
    for name, style in plan.items():
        n_in, n_out = widths(model.get_submodule(name)) or (0, 0)
        colwise = by_columns(style)
        if colwise and n_out % tp:
            raise UsageError(f"--tp {tp} does not divide the {n_out} output features of {name!r} "
                             f"(sharded by columns); choose a --hidden that tp divides ({_divisors(n_out)})")
        if colwise is False and n_in % tp:
            raise UsageError(f"--tp {tp} does not divide the {n_in} input features of {name!r} "
                             f"(sharded by rows); choose a --hidden that tp divides ({_divisors(n_in)})")


def _divisors(width: int) -> str:
    return "--tp " + ", ".join(str(d) for d in range(2, min(width, 64) + 1) if width % d == 0) + " divide it"
