"""Sharded data parallelism: FSDP2 (``fully_shard``) over a 1-D mesh, and HSDP over a 2-D one.

Data parallelism keeps a full copy of the parameters, gradients and optimizer state on
every rank. ZeRO (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC20) shards all three over the W data-parallel ranks, so
each rank keeps 1/W of them: parameters are all-gathered just before a block's forward
(and again before its backward), and gradients are reduce-scattered instead of
all-reduced. PyTorch FSDP (Zhao et al., 2023, "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel", VLDB) implements it; FSDP2's ``fully_shard`` stores each
parameter as a DTensor sharded on dim 0, so a rank's optimizer only ever sees its shard.

The unit of communication is the module passed to ``fully_shard``: we shard each block
first (one all-gather per block, freed again after its forward) and then the root, which
takes whatever parameters are left. ``reshard_after_forward=False`` keeps the gathered
parameters from forward to backward (ZeRO-2-like: one all-gather fewer, more memory).

HSDP (hybrid sharding) shards over S ranks and replicates those shards over R groups,
(R, S) = (dp_replicate, dp_shard): the all-gathers stay inside a group of S (say, one
node) and only the gradient all-reduce crosses groups.
"""

from __future__ import annotations

import re
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

try:  # public since torch 2.6
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older 2.x builds
    from torch.distributed._composable.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from gpupar.config import ParallelConfig
from gpupar.errors import UsageError
from gpupar.parallel.tied import fsdp_groups

TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def pick_blocks(model: nn.Module, blocks: str = "auto", min_params: int = 100_000) -> list[nn.Module]:
    """The modules to shard as units before the root, children before their parents.

    ``auto``: every child (with parameters) of an ``nn.Sequential`` or ``nn.ModuleList``
    (the layers of an MLP, the blocks of a transformer), every ``nn.TransformerEncoderLayer``
    / ``DecoderLayer``, and elsewhere every ``nn.Linear`` with at least ``min_params``
    parameters; a class the model names in ``_no_split_modules`` (a Hugging Face decoder layer)
    is a unit wherever it sits. A chosen unit is not searched further. ``none``: only the root.
    Otherwise a comma-separated list of class names, for example ``Block,Linear``.
    """
    if blocks == "none":
        return []
    if blocks != "auto":
        names = {n.strip() for n in blocks.split(",") if n.strip()}
        present = {type(m).__name__ for m in model.modules()}
        if unknown := sorted(names - present):
            raise UsageError(f"--fsdp-blocks {unknown[0]!r} is not a module class in this model; "
                             f"accepted: auto, none, or names from {', '.join(sorted(present))}")
        # Reversed pre-order puts every module before the modules that contain it.
        return [m for m in reversed(list(model.modules())) if type(m).__name__ in names and m is not model]

    chosen: list[nn.Module] = []
    no_split = set(getattr(model, "_no_split_modules", None) or ())  # a Hugging Face model's own layers

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if not any(True for _ in child.parameters()):
                continue  # activations, dropout: nothing to shard
            big_linear = isinstance(child, nn.Linear) and sum(p.numel() for p in child.parameters()) >= min_params
            layer = isinstance(child, TRANSFORMER_LAYERS) or type(child).__name__ in no_split
            if isinstance(module, (nn.Sequential, nn.ModuleList)) or layer or big_linear:
                chosen.append(child)
            else:
                visit(child)

    visit(model)
    return chosen


class GlooReduceScatter:
    """FSDP2's reduce-scatter on gloo, as an in-place all-reduce of FSDP's own input buffer.

    gloo implements a reduce-scatter as an all-reduce of a copy of its input
    (``ProcessGroupGloo::reduce_scatter_tensor_coalesced`` clones it), and the copy is freed by
    whichever thread drops the work object last: on a loaded CPU, now and then gloo's worker
    thread, after the next unit's all-gather. A rank's peak then moves by one unit's
    gradients from step to step, which no plan can predict. FSDP's reduce-scatter input is a
    scratch buffer already, so reducing it in place moves the same bytes, gives the same sums,
    and allocates nothing. Used through FSDP2's ``set_custom_reduce_scatter`` where this torch
    has it (``gloo_reduce_in_place``; older builds keep gloo's copy).
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        # input [S * n] (S chunks of n, this rank's is chunk `rank`) -> output [n]
        average = op == dist.ReduceOp.AVG
        dist.all_reduce(input_tensor, op=dist.ReduceOp.SUM if average else op, group=group)
        chunk = input_tensor.view(group.size(), -1)[group.rank()]
        output_tensor.copy_(chunk.div_(group.size()) if average else chunk)
        return None


def gloo_reduce_in_place() -> bool:
    """Whether this torch lets ``apply_fsdp`` replace gloo's reduce-scatter (see GlooReduceScatter)."""
    return hasattr(FSDPModule, "set_custom_reduce_scatter")


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, options: ParallelConfig, precision: str = "fp32") -> nn.Module:
    """Shard ``model`` (already on this rank's device) in place over ``mesh``; returns it.

    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32
    (a sum of W bf16 gradients would lose bits). fp16 keeps fp32 parameters under autocast.
    """
    mp_policy = MixedPrecisionPolicy()
    if precision == "bf16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = {}
    if options.cpu_offload:
        if mesh.device_type == "cpu":
            if mesh.get_rank() == 0:
                print("--cpu-offload: the parameters already live in CPU memory on a CPU-only run; "
                      "offloading is skipped", file=sys.stderr)
        else:
            # Sharded parameters, gradients and optimizer state live in (pinned) CPU memory;
            # the optimizer step runs on the CPU. Each block is copied to the GPU to run.
            offload = {"offload_policy": CPUOffloadPolicy()}
    blocks = pick_blocks(model, options.fsdp_blocks, options.fsdp_min_params)
    units = [fully_shard(group if len(group) > 1 else group[0], mesh=mesh,
                         reshard_after_forward=options.reshard_after_forward, mp_policy=mp_policy, **offload)
             for group in fsdp_groups(model, blocks)]  # blocks that share a tied Parameter shard as one unit
    # The root takes the remaining parameters. FSDP never reshards the root after forward:
    # backward starts with it, so its parameters would be gathered again at once.
    units.append(fully_shard(model, mesh=mesh, reshard_after_forward=options.reshard_after_forward,
                             mp_policy=mp_policy, **offload))
    if mesh.device_type == "cpu" and gloo_reduce_in_place():
        for unit in units:
            (unit[0] if isinstance(unit, list) else unit).set_custom_reduce_scatter(GlooReduceScatter())
    # FSDP2 warns when a unit returns a view, since an in-place op on it would skip a hook. A
    # tensor-parallel layer's output is one (DTensor.to_local), and the root's output goes only
    # to the loss: for those units the warning is noise on every rank. Other units keep it.
    for unit in [model, *(b for b in blocks if any(isinstance(p, DTensor) for p in b.parameters()))]:
        warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({re.escape(type(unit).__name__)}\) "
                                "returned a view tensor")
    return model
