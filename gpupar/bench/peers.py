"""Peers for `gpupar bench --peers`: the same DDP workload, hand-written or in another framework.

``raw`` is the loop a user writes with ``torch.nn.parallel.DistributedDataParallel``
directly (default DDP settings); ``fabric`` is Lightning Fabric's ``setup`` / ``backward``;
``accelerate`` is Hugging Face Accelerate's ``prepare`` / ``backward``. Each rank builds the
model, data and optimizer from the same config as gpupar's run, takes its contiguous slice
of the same global batch and trains with the same loss and optimizer, so the step-time
ratios measure framework overhead only. Fabric and Accelerate are optional
(``pip install 'gpupar[peers]'``); they find the process group that gpupar's launcher
already started.
"""

from __future__ import annotations

import importlib.util

import torch

from gpupar.config import Config
from gpupar.topology import Topology

PEERS = ("raw", "fabric", "accelerate")
_MODULES = {"fabric": "lightning_fabric", "accelerate": "accelerate"}


def missing_reason(peer: str) -> str | None:
    """Why ``peer`` cannot run here (its package is missing), or None."""
    module = _MODULES.get(peer)
    if module and importlib.util.find_spec(module) is None:
        return f"{peer}: package {module} is not installed; pip install 'gpupar[peers]'"
    return None


def train_peer(peer: str, cfg: Config, topo: Topology, on_step) -> None:
    """Train ``cfg``'s model for its epochs (one global batch each) with ``peer``'s DDP."""
    from gpupar.data import shard_batch
    from gpupar.training.recipe import make_loss, make_optimizer
    from gpupar.job import load_problem

    problem = load_problem(cfg)
    rows = shard_batch(torch.arange(cfg.train.batch_size), topo.world_size, topo.rank)
    x, y = problem.X[rows].to(topo.device), problem.y[rows].to(topo.device)  # this rank's slice
    loss_fn, model = make_loss(cfg, problem.spec.loss), problem.model.to(topo.device)
    optimizer = make_optimizer(model, cfg)

    if peer == "raw":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[topo.device.index] if topo.device.type == "cuda" else None)
        backward = torch.Tensor.backward
    elif peer == "fabric":
        from lightning_fabric import Fabric

        fabric = Fabric(accelerator=topo.device.type, devices=topo.world_size, strategy="ddp", precision="32-true")
        fabric.launch()  # under TorchElastic this joins the existing ranks, it starts none
        model, optimizer = fabric.setup(model, optimizer)
        backward = fabric.backward
    elif peer == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=topo.device.type == "cpu")
        model, optimizer = accelerator.prepare(model, optimizer)
        backward = accelerator.backward
    else:
        raise ValueError(f"unknown peer {peer!r}")

    for step in range(1, cfg.train.epochs + 1):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        backward(loss)
        optimizer.step()
        on_step(step)
