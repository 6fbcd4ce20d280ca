"""Who this process is when the user's own script runs: torchrun's variables, SLURM's, a
process group the user (or Ray Train) already started, or one process alone."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from gpupar.config import Config
from gpupar.devices import backend_for, pick_device
from gpupar.launch.elastic import SLURM_PORT, first_slurm_host
from gpupar.topology import ParallelDims, Topology, leave_at_exit


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) from torchrun, SLURM, or an existing process group."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return dist.get_rank(), world, int(env.get("LOCAL_RANK", dist.get_rank())), world
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(SLURM_PORT))
        world = int(env["SLURM_NTASKS"])
        return (int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                int(env.get("SLURM_NTASKS_PER_NODE", world).split("(")[0]))
    return 0, 1, 0, 1


def topology(cfg: Config) -> Topology:
    """Join (or reuse) the process group and resolve the layout once, as ``Topology.from_env`` does."""
    rank, world, local_rank, local_world = world_from_env()
    device = pick_device(cfg.train.device, local_rank)
    if world == 1:
        return Topology.single(device if device.type != "mps" else device, ParallelDims())
    if device.type == "mps":
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg.parallel.timeout))
        leave_at_exit()
    dims = ParallelDims.of(cfg, world, local_world)
    return Topology(device=device, rank=rank, local_rank=local_rank, world_size=world, dims=dims,
                    mesh=dims.build_mesh(device.type))
