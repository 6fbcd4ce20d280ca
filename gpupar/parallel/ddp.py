"""Data parallelism: every rank holds the whole model and a slice of each global batch.

DistributedDataParallel all-reduces gradients in buckets while backward is still running,
so communication overlaps computation (Li et al., 2020, "PyTorch Distributed: Experiences
on Accelerating Data Parallel Training", VLDB). ``DataParallel`` is the older
single-process, multi-GPU form, kept for comparison and notebooks.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gpupar.config import ParallelConfig
from gpupar.errors import UsageError
from gpupar.topology import Topology


def apply_ddp(model: nn.Module, topo: Topology, options: ParallelConfig) -> DistributedDataParallel:
    """Wrap ``model`` (already on ``topo.device``) in DDP with the configured bucket and hook."""
    if options.ddp_comm_hook == "bf16" and topo.device.type != "cuda":
        raise UsageError("--ddp-comm-hook bf16 needs NCCL on CUDA; on CPU (gloo) use fp16 or none")
    ddp = DistributedDataParallel(
        model,
        device_ids=[topo.device.index] if topo.device.type == "cuda" else None,
        bucket_cap_mb=options.ddp_bucket_mb,
        # Gradients live inside the all-reduce buckets: one copy fewer per step.
        gradient_as_bucket_view=True,
        static_graph=options.ddp_static_graph,
    )
    if options.ddp_comm_hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif options.ddp_comm_hook == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def apply_data_parallel(model: nn.Module, topo: Topology) -> nn.Module:
    """``nn.DataParallel`` over all visible GPUs; with fewer than 2 it says so and stays on one device."""
    gpus = torch.cuda.device_count() if topo.device.type == "cuda" else 0
    if gpus < 2:
        print(f"--strategy dp: {gpus} GPU(s) visible, DataParallel needs 2 or more; "
              f"training on {topo.device} alone", file=sys.stderr)
        return model
    return nn.DataParallel(model)
