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
- pipeline: stages live on different ranks, so a tie across stages cannot hold; ``check_pp``
  refuses it, naming the two parameters, before any rank starts.
"""

from __future__ import annotations

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


def check_pp(stages: list[nn.Module], model: nn.Module) -> None:
    """A tie must stay inside one pipeline stage (each stage is a copy of ``model`` without
    the other stages' modules, with the whole model's parameter names)."""
    holds = [{n for n, _ in stage.named_parameters(remove_duplicate=False)} for stage in stages]
    for names in tied_parameters(model):
        for held in holds:
            kept = [n for n in names if n in held]
            if kept and len(kept) < len(names):
                lost = next(n for n in names if n not in held)
                raise UsageError(f"--pp: {kept[0]!r} and {lost!r} are one tied parameter but fall in different "
                                 f"pipeline stages, which cannot share weights; {_untie_hint(model)}")


def _untie_hint(model: nn.Module) -> str:
    """A Hugging Face model ties its embedding to its head by config, and its stages keep the
    embedding first and the head last, so no split point joins them: untying is the way."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return ("untie them with --hf-config tie_word_embeddings=false (the head is then its own weight, "
                "another model) or use fsdp/ddp/tp")
    return "keep them in one stage (--split-points) or use fsdp/ddp/tp"
