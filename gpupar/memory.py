"""Per-rank memory: what a strategy keeps resident, counted from the tensors each rank holds.

"Persistent" memory is what lives across steps: parameters, gradients (between backward
and the optimizer step) and optimizer state (Adam keeps two moments per parameter, so
params + grads + Adam state = 4 x the parameter bytes under data parallelism). Sharded
tensors (FSDP's DTensors) are counted by their local shard, so the figure shows what
sharding saves on each rank. Activations and communication buffers are transient: they
show up in the peak, not here.

The peak is ``torch.cuda.max_memory_allocated`` on a GPU (the caching allocator's high
water mark for tensors). On a CPU there is no allocator counter, so the peak is the
process's maximum resident set size (``ru_maxrss``): it includes the Python interpreter
and the torch libraries (a few hundred MB), so compare it between runs, not with the
persistent bytes.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist
from torch import nn

from gpupar.topology import Topology


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2, tensor parallel); the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds for ``tensor``: its local shard when it is a DTensor."""
    tensor = local_shard(tensor)
    return tensor.numel() * tensor.element_size()


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """This process's peak memory so far, and how it was read: the CUDA allocator's high-water
    mark on a GPU, the process's maximum resident set size otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), "cpu_max_rss"


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients this rank holds now (call it between backward and the step)."""
    return sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer, grads: int, device: torch.device) -> dict:
    """This rank's persistent bytes (parameters, gradients, optimizer state) and its peak."""
    params = sum(local_bytes(p) for p in model.parameters())
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    peak, peak_kind = peak_bytes(device)
    return {"param_bytes": params, "grad_bytes": grads, "optim_bytes": state,
            "persistent_bytes": params + grads + state, "peak_bytes": peak, "peak_kind": peak_kind}


def gather_memory_report(model: nn.Module, optimizer: torch.optim.Optimizer, grads: int,
                         topo: Topology) -> list[dict]:
    """Every rank's report, in rank order (a collective when distributed)."""
    mine = {"rank": topo.rank, **memory_report(model, optimizer, grads, topo.device)}
    if not topo.distributed:
        return [mine]
    everyone: list = [None] * topo.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def format_memory_report(rows: list[dict]) -> str:
    """A small table, one line per rank, in KiB, MiB or GiB (whichever suits the largest figure)."""
    peak_name = "peak alloc" if rows[0]["peak_kind"] == "cuda_max_memory_allocated" else "peak RSS"
    largest = max(r["persistent_bytes"] for r in rows)
    unit, size = next(((u, s) for u, s in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2)) if largest >= s), ("KiB", 1024))
    lines = [f"Memory per rank ({unit}; persistent = params + grads + optimizer state, local shards; "
             f"{peak_name} = {rows[0]['peak_kind']}, MiB):",
             f"{'rank':>6}  {'params':>9}  {'grads':>9}  {'optimizer':>9}  {'persistent':>10}  {peak_name:>10}"]
    for r in rows:
        lines.append(f"{r['rank']:>6}  {r['param_bytes'] / size:9.2f}  {r['grad_bytes'] / size:9.2f}  "
                     f"{r['optim_bytes'] / size:9.2f}  {r['persistent_bytes'] / size:10.2f}  "
                     f"{r['peak_bytes'] / 1024 ** 2:10.1f}")
    return "\n".join(lines)
