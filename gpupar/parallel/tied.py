"""Tied weights: one ``nn.Parameter`` reached under several names.

Language models tie the input embedding to the output projection (Press & Wolf, 2017,
"Using the Output Embedding to Improve Language Models"); ALBERT shares one set of layer
weights across all layers (Lan et al., 2020). On one device the tie is free: both modules
hold the same tensor, and autograd adds both uses' gradients into it. Each strategy can
break it silently, so each one keeps it or refuses it:

- DDP: registers every Parameter once, so the tie holds as it is;
- FSDP2: a Parameter must belong to one ``fully_shard`` group, so modules that share one are
  sharded together (``fsdp_groups``), and a tie that reaches the root leaves it to the root;
- tensor parallel: ``parallelize_module`` replaces each module's parameters one module at a
  time, which would make two sharded copies; ``retie`` points the other names back at the
  first copy, and ``check_tp`` refuses (before any rank starts) a tie whose modules are
  sharded differently;
- pipeline: stages live on different ranks, so a tie across stages cannot be one tensor. As
  Megatron-LM does for its tied embedding and output head, each stage that holds a name of
  the tie keeps its own copy, all starting from the same values; after every backward
  ``StageTies.sum_grads`` adds the copies' gradients (over a process group of the pp ranks
  that hold them, one per data/tensor-parallel replica, and locally where one rank holds two
  stages, as the V-shaped schedules put the first and the last stage on rank 0), so every
  copy takes the one-device gradient and the same optimizer step, and stays bit-equal. The
  clip norm counts the tie once, and checkpoints keep one value under its names
  (``pipeline_state``). What still cannot hold is refused before launch by ``check_pp``: a
  tie across stages whose modules tensor parallel shards differently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gpupar.errors import UsageError


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of qualified names (two or more) under which one Parameter is reached."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append(f"{module_name}.{name}" if module_name else name)
    return [group for group in names.values() if len(group) > 1]


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def fsdp_groups(model: nn.Module, blocks: list[nn.Module]) -> list[list[nn.Module]]:
    """``blocks`` (FSDP's units) grouped so that no Parameter spans two groups; a block that
    shares a Parameter with the root's own modules is dropped (the root takes it)."""
    index = {id(b): i for i, b in enumerate(blocks)}
    unit_of: dict[str, int | None] = {}  # module name -> the block it lies in (None: the root)
    for module_name, module in model.named_modules(remove_duplicate=False):
        parent = unit_of.get(module_name.rpartition(".")[0]) if module_name else None
        unit_of[module_name] = index.get(id(module), parent)
    group = list(range(len(blocks)))

    def find(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    dropped: set[int] = set()
    for names in tied_parameters(model):
        units = {unit_of[_owner(n)] for n in names}
        if None in units:
            dropped |= {u for u in units if u is not None}
        units.discard(None)
        first, *rest = sorted(units) or [None]
        for u in rest:
            group[find(u)] = find(first)
    merged: dict[int, list[nn.Module]] = {}
    for i, block in enumerate(blocks):
        if not any(find(i) == find(d) for d in dropped):
            merged.setdefault(find(i), []).append(block)
    return list(merged.values())


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """After tensor parallel: every name of a tie group points at its first name's Parameter."""
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            setattr(model.get_submodule(_owner(name)), name.rpartition(".")[2], first)


def check_tp(model: nn.Module, plan: dict) -> None:
    """Tied parameters must be sharded alike: the same style on every module that holds them."""
    for names in tied_parameters(model):
        styles = {type(plan.get(_owner(n))).__name__ if _owner(n) in plan else "not sharded" for n in names}
        if len(styles) > 1:
            raise UsageError(f"--tp: {names[0]!r} and {names[1]!r} are one tied parameter but the tensor-parallel "
                             f"plan shards their modules differently ({', '.join(sorted(styles))}); "
                             "give both modules the same style")


def check_pp(model: nn.Module, plan: dict | None) -> None:
    """A tie across pipeline stages keeps one copy per stage whose gradients are summed
    (``StageTies``); under tensor parallel the copies must be sharded alike for their local
    shards to add up, so the whole model's plan must shard every module of a tie alike."""
    if plan:
        try:
            check_tp(model, plan)
        except UsageError as exc:
            raise UsageError(f"{exc} (with --pp, each stage's copy of a tie must be sharded alike)") from None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP, TP), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _layout(p: nn.Parameter) -> str:
    """A copy's local shape and sharding: every copy of a tie must have the same one."""
    return f"{list(_local(p).shape)} {getattr(p, 'placements', 'whole')}"


class StageTies:
    """The copies of each tied Parameter that this rank's pipeline stages hold, and the
    process groups that add up their gradients (see the module docstring).

    ``groups`` are the whole model's tie groups (``tied_parameters``, before the split), and
    ``stages`` this rank's stage modules, each under the whole model's parameter names. Every
    rank must build it at the same point (one all-gather and the same ``new_group`` calls)."""

    def __init__(self, groups: list[list[str]], stages: list[nn.Module], pp_group: dist.ProcessGroup):
        self.alias = {name: names[0] for names in groups for name in names}
        """Each tied name -> the tie's first name (the one a single device's optimizer uses)."""
        self.copies: list[list[nn.Parameter]] = []  # per tie group: this rank's distinct copies
        for names in groups:
            found: dict[int, nn.Parameter] = {}
            for stage in stages:
                for name, p in stage.named_parameters(remove_duplicate=False):
                    if name in names:
                        found.setdefault(id(p), p)
            self.copies.append(list(found.values()))
        self.process_groups: list[tuple[dist.ProcessGroup | None, int]] = []  # (group, global src) per tie
        self.uncounted: set[int] = set()  # ids of copies the clip norm leaves out (counted once elsewhere)
        if not groups:  # no tie: nothing to gather or sum
            return
        pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        # Which pp ranks hold each tie, and every pipeline replica's ranks (the same on each rank).
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (tuple(dist.get_process_group_ranks(pp_group)), pp_rank,
                                          [[_layout(p) for p in c] for c in self.copies]))
        replicas = sorted({ranks for ranks, _, _ in everyone})
        mine = tuple(dist.get_process_group_ranks(pp_group))
        for g, copies in enumerate(self.copies):
            holders = sorted({r for ranks, r, held in everyone if ranks == mine and held[g]})
            layouts = {layout for ranks, _, held in everyone if ranks == mine for layout in held[g]}
            if len(layouts) > 1:  # the local shards would not add up (nor fit one all-reduce)
                raise UsageError(f"--pp: the stages' copies of the tied {groups[g][0]!r} are laid out differently "
                                 f"({'; '.join(sorted(layouts))}); shard every module of a tie alike")
            group = None
            if len(holders) > 1:
                if len(holders) == pp:
                    group = pp_group
                else:  # every rank creates every replica's group, in the same order
                    made = [dist.new_group([ranks[r] for r in holders]) for ranks in replicas]
                    group = made[replicas.index(mine)]
            counted_here = holders[:1] == [pp_rank]
            self.uncounted |= {id(p) for p in (copies[1:] if counted_here else copies)}
            self.process_groups.append((group, mine[holders[0]] if holders else 0))
        self._same_start()

    @torch.no_grad()
    def _same_start(self) -> None:
        """Every copy starts from the first holder's values (a no-op after ``rank0_initial_state``;
        the keep-your-loop API leaves the user's init to the user, and a tie is one value)."""
        for copies, (group, src) in zip(self.copies, self.process_groups):
            if not copies:
                continue
            first = _local(copies[0].data)
            if group is not None:
                dist.broadcast(first, src=src, group=group)
            for p in copies[1:]:
                _local(p.data).copy_(first)

    def set_aside(self) -> list[list[torch.Tensor | None]]:
        """Take the copies' gradients out before a backward (``sum_grads`` puts them back): a
        loop that accumulates over several ``forward_backward`` calls already summed them once."""
        earlier = [[p.grad for p in copies] for copies in self.copies]
        for copies in self.copies:
            for p in copies:
                p.grad = None
        return earlier

    @torch.no_grad()
    def sum_grads(self, earlier: list[list[torch.Tensor | None]]) -> None:
        """Give every copy the sum of all copies' gradients of this backward (the one-device
        gradient of the tie) on top of what ``set_aside`` took out: after the backward, before
        the inf check, the clip and the optimizer step, so that each of them sees the summed
        gradient (the scaled one under fp16: the sum is linear)."""
        for copies, (group, _), before in zip(self.copies, self.process_groups, earlier):
            if not copies or not copies[0].requires_grad:  # a frozen tie takes no gradient (nor a zero one)
                continue
            for p in copies:
                if p.grad is None:  # this copy took no part in this backward: it adds nothing
                    p.grad = torch.zeros_like(p)
            total = _local(copies[0].grad).clone()
            for p in copies[1:]:
                total += _local(p.grad)
            if group is not None:
                dist.all_reduce(total, group=group)
            for p, grad in zip(copies, before):  # the earlier sums are equal on every copy
                if grad is None:
                    _local(p.grad).copy_(total)
                else:
                    _local(grad).add_(total)
                    p.grad = grad
