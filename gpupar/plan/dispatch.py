"""What DTensor and FSDP2 cost per layer on this machine, apart from arithmetic and bytes moved.

The roofline (plan.memory.step_time) prices FLOPs, collectives and plain op dispatch. A
tensor-parallel layer also runs DTensor's sharding propagation and redistribution in Python,
and an FSDP2 unit its pre/post-forward and backward hooks, the copy-in and copy-out around
each all-gather and the reduce-scatter's bookkeeping: on a CPU these cost tens to hundreds
of microseconds each, far more than the tiny models' arithmetic. They are measured here once
per machine and torch version (cached beside the collective probe): the same small step of
``LAYERS`` Linear layers, plain, under a tensor-parallel plan, and with every layer an FSDP2
unit, on a one-rank gloo mesh in a child process (so the caller's process group is
untouched); the differences per layer are the costs. A one-rank mesh runs the same Python
paths; what more ranks add (the wire) is the collective probe's part.

    python -m gpupar.plan.dispatch   # prints {"tp_layer_s": ..., "fsdp_unit_s": ...}
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

LAYERS = 8
WIDTH = 16
BATCH = 4


def probe_dispatch(timeout_s: float = 120.0) -> dict:
    """{"tp_layer_s", "fsdp_unit_s"}: seconds per tensor-parallel Linear and per FSDP2 unit, for
    one forward and backward, from a child process (0 for both if it fails: then the time
    model prices plain dispatch only, as before)."""
    try:
        out = subprocess.run([sys.executable, "-m", "gpupar.plan.dispatch"], capture_output=True, text=True,
                             timeout=timeout_s, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return {"tp_layer_s": 0.0, "fsdp_unit_s": 0.0}


def _step_seconds(model, x, repeats: int = 30) -> float:
    """The median of ``repeats`` forward + backward steps, after warm-up."""
    times = []
    for i in range(repeats + 5):
        start = time.perf_counter()
        model(x).sum().backward()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from gpupar.parallel.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one rank: no port
    mesh = init_device_mesh("cpu", (1,))

    def layers() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])

    x = torch.randn(BATCH, WIDTH)
    plain = _step_seconds(layers(), x)
    tp = parallelize_module(layers(), mesh, {str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel()
                                             for i in range(LAYERS)})
    tensor_parallel = _step_seconds(tp, x)
    sharded = layers()
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    fsdp = _step_seconds(sharded, x)
    print(json.dumps({"tp_layer_s": max(0.0, (tensor_parallel - plain) / LAYERS),
                      "fsdp_unit_s": max(0.0, (fsdp - plain) / (LAYERS + 1))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
