"""What a step allocates besides the activations (``gpupar plan``): the optimizer's temporaries
and the communication buffers of each layout, derived from how torch allocates them.

Each term is the bytes alive at once at the moment that matters (the step's peak), per rank,
from the shapes of the rank's local model (plan.memory.local_model): no per-model constants.
"""

from __future__ import annotations

from torch import nn

from gpupar.config import Config
from gpupar.topology import ParallelDims
from gpupar.training.recipe import fused_kernels


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def optimizer_fused(model: nn.Module, cfg: Config, dims: ParallelDims, tp_layers: set[str], device_type: str) -> bool:
    """Whether ``recipe.make_optimizer`` picks the fused kernel for this rank's parameters,
    by its own rule (``recipe.fused_kernels``) on the parameters as they will be: DTensors
    under FSDP, and in the tensor-parallel layers."""
    kinds = [(dims.fsdp_enabled or (dims.tp_enabled and name.rpartition(".")[0] in tp_layers),
              p.is_floating_point(), device_type) for name, p in model.named_parameters()]
    return fused_kernels(cfg, kinds)


def optimizer_temporaries(model: nn.Module, cfg: Config, dims: ParallelDims, tp_layers: set[str],
                          device_type: str, shard: float) -> int:
    """Bytes the optimizer step allocates above its state, at its peak.

    Fused Adam/AdamW/SGD update in one kernel: nothing. Otherwise torch's default: a loop over
    tensors on the CPU (Adam's ``exp_avg_sq.sqrt() / bias_correction`` holds two tensors of
    the parameter's size at once, a third with Adam's weight decay ``grad.add(param)``; SGD
    only the latter), the foreach kernels on a GPU (the same temporaries, for every tensor of
    the group at once). ``shard`` scales a parameter to the part the rank updates (1/S under FSDP).
    """
    if optimizer_fused(model, cfg, dims, tp_layers, device_type):
        return 0
    o = cfg.optim
    per_tensor = {"adam": 2 + (o.weight_decay != 0), "adamw": 2}.get(o.optimizer, int(o.weight_decay != 0))
    sizes = [nbytes(p) * shard for p in model.parameters() if p.requires_grad] or [0]
    return int(per_tensor * (sum(sizes) if device_type == "cuda" else max(sizes)))


def gathered_bytes(params, shards: int) -> int:
    """A unit's all-gather output: each parameter's dim 0 padded to a multiple of ``shards``."""
    total = 0
    for p in params:
        if p.dim() == 0:
            total += nbytes(p) * shards
        else:
            rows = -(-p.shape[0] // shards) * shards
            total += rows * (p.numel() // max(p.shape[0], 1)) * p.element_size()
    return total


def unit_gathered_bytes(model: nn.Module, options, shards: int) -> list[int]:
    """Each FSDP unit's all-gather output, in the probe's unit order (the root last)."""
    from gpupar.parallel.fsdp import pick_blocks
    from gpupar.plan.probe import unit_parameters

    units = pick_blocks(model, options.fsdp_blocks, options.fsdp_min_params)
    return [gathered_bytes(ps, shards) for ps in unit_parameters(model, units)]


def fsdp_buffers(probe, model: nn.Module, options, shards: int, device_type: str) -> int:
    """The most a step holds at once under FSDP2: the probe's activations and gradients (a
    reduced gradient counting 1/S) plus FSDP's own buffers, replayed along the probe's
    markers as FSDP2 allocates them:

    - the copy-out into the unsharded parameters exists beside the all-gather output (the
      padded parameters); in forward that output stays alive until the next unit's all-gather
      is waited on, or the root's forward ends; in backward it is released at once;
    - forward frees a unit's unsharded parameters at its end (``reshard_after_forward``; never
      the root's); backward gathers them again when its output's gradient arrives, and then
      prefetches the next unit's all-gather output (FSDP2's implicit backward prefetch);
    - a unit's gradients stay unsharded (full size) until its last one is accumulated; then its
      parameters are resharded, the previous reduce-scatter input freed, the gradients copied
      into a new reduce-scatter input (alive until the next unit's reduction) and freed. On
      gloo the all-gather allocates a flat temporary of its output's size; so does the
      reduce-scatter, on a torch too old for gpupar's in-place one (fsdp.GlooReduceScatter).
    """
    from gpupar.parallel.fsdp import gloo_reduce_in_place

    size = unit_gathered_bytes(model, options, shards)
    root, scale, gloo = len(size) - 1, 1.0 / shards, device_type == "cpu"
    gloo_reduce_copy = gloo and not gloo_reduce_in_place()
    gathered: dict[int, int] = {}  # all-gather outputs alive
    unsharded: dict[int, int] = {}
    state = {"reduce_input": 0, "reduced": 0, "backward": False, "peak": 0}
    forward_order: list[int] = []

    def check(i: int, extra: int = 0) -> None:
        live, grads = probe.samples[min(i, len(probe.samples) - 1)] if probe.samples else (0, 0)
        held = sum(gathered.values()) + sum(unsharded.values()) + state["reduce_input"]
        unreduced = (1 - scale) * (grads - state["reduced"])  # full-size gradients not yet reduce-scattered
        state["peak"] = max(state["peak"], int(live + scale * grads + held + unreduced + extra))

    def gather(i: int, k: int) -> None:
        if k in unsharded:
            return
        if k not in gathered:
            gathered[k] = size[k]
        unsharded[k] = size[k]  # copy-out beside the all-gather output
        check(i)
        if state["backward"]:  # backward releases a unit's all-gather output at its own wait
            del gathered[k]
        else:  # forward keeps it until the next unit's wait, which releases the previous one
            for other in [u for u in gathered if u != k]:
                del gathered[other]

    markers = iter(probe.markers)
    marker = next(markers, None)
    for i in range(len(probe.samples) + 1):
        while marker is not None and marker[0] <= i:
            _, event, k = marker
            at = max(i - 1, 0)
            if event == "forward" and not state["backward"]:
                gather(at, k)
                forward_order.append(k)
            elif event == "forward_end" and not state["backward"]:
                if k == root:  # the root's post-forward releases the last all-gather output
                    gathered.clear()
                elif options.reshard_after_forward:
                    unsharded.pop(k, None)
            elif event == "backward":
                state["backward"] = True
                gather(at, k)
                later = [u for u in reversed(forward_order) if u != root]
                nxt = later[later.index(k) + 1] if k in later and later.index(k) + 1 < len(later) else None
                if nxt is not None and nxt not in unsharded and nxt not in gathered:
                    check(at, size[nxt] * gloo)  # gloo's flat all-gather temporary
                    gathered[nxt] = size[nxt]
            elif event == "reduce":
                unsharded.pop(k, None)
                state["reduce_input"] = size[k]
                check(at)
                # the gradients accumulated by now (the marker's own sample counts them) are reduced
                state["reduced"] = probe.samples[min(i, len(probe.samples) - 1)][1] if probe.samples else 0
                check(at, size[k] * gloo_reduce_copy)  # gloo's own reduce-scatter copies its input
            marker = next(markers, None)
        if i < len(probe.samples):
            check(i)
    return state["peak"]


def gloo_late_bytes(model: nn.Module, options, dims: ParallelDims, activation_bytes: int, sent_bytes: int) -> int:
    """What gloo may still hold beyond the step's program order: the largest tensor one
    collective of this layout holds. A gloo work object keeps its tensors until the worker
    thread that ran it lets go, a moment after the rank's wait returns; on CPU cores shared
    by the ranks that thread is now and then descheduled, and a tensor the rank has dropped
    is freed later (measured: FSDP's all-gather output, 453 KiB above a gpt-m fsdp(4) rank's
    peak in some steps; a DTensor all-reduce's output, 32 KiB on mlp-m tp(4)). Candidates:
    under FSDP2 a unit's all-gather output (and, on a torch without the in-place
    reduce-scatter, gloo's copy of its input); under tensor parallelism ``activation_bytes``,
    the largest activation all-reduced; a pipeline stage's sent output, ``sent_bytes``. One at
    a time: part of the runtime allowance (what fits), not of the peak."""
    late = [activation_bytes if dims.tp_enabled else 0, sent_bytes if dims.pp_enabled else 0]
    if dims.fsdp_enabled:
        late += unit_gathered_bytes(model, options, dims.dp_shard)
    return max(late)
