"""The one topology object: who this process is, on which device, and how ranks are arranged.

Ranks form a 3-D grid of degrees ``pp x dp x tp`` (their product is the world size), laid
out as one named ``DeviceMesh`` with dimensions ``("pp", "dp", "tp")``. All three
dimensions always exist (a degree of 1 is a dimension of size 1), so ``mesh["dp"]`` is
valid in every run. ``tp`` is innermost: tensor-parallel peers are consecutive ranks
(the same node, the fastest links), as in Megatron-LM and torchtitan. Rank r sits at
``pp_rank = r // (dp*tp)``, ``dp_rank = (r // tp) % dp``, ``tp_rank = r % tp``.

It is built once per process (``Topology.single`` or ``Topology.from_env`` after the
launcher started the ranks), validated, and passed explicitly to the strategies and the
training loop. Nothing reaches for it through a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gpupar.config import Config
from gpupar.devices import backend_for, pick_device
from gpupar.errors import UsageError


@dataclass(frozen=True)
class Topology:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dp: int = 1
    """Data-parallel degree: how many ranks split each global batch."""
    tp: int = 1
    """Tensor-parallel degree: ranks that split each layer's weights and see the same data."""
    pp: int = 1
    """Pipeline-parallel degree: ranks that each hold consecutive layers."""
    mesh: DeviceMesh | None = None
    """The named ("pp", "dp", "tp") mesh; None in a single process."""

    @classmethod
    def single(cls, device: torch.device) -> "Topology":
        return cls(device=device)

    @classmethod
    def from_env(cls, cfg: Config) -> "Topology":
        """Join the process group that torchrun / TorchElastic set up for this rank.

        Each rank takes cuda:LOCAL_RANK on GPUs (NCCL) or the CPU (gloo). The process-group
        timeout bounds every collective, so a dead or stuck peer fails the job instead of
        hanging it.
        """
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        device = pick_device(cfg.train.device, local_rank)
        if device.type == "mps":
            device = torch.device("cpu")  # no MPS backend for collectives
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif "OMP_NUM_THREADS" not in os.environ:
            # W ranks on one machine share its cores; more threads than cores thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dp, tp, pp = degrees(cfg, world)
        if not dist.is_initialized():
            timeout = timedelta(seconds=cfg.parallel.timeout)
            dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=timeout,
                                    store=_attempt_store(rank, world, timeout))
        mesh = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        return cls(device=device, rank=rank, local_rank=local_rank, world_size=world, dp=dp, tp=tp, pp=pp,
                   mesh=mesh)

    def close(self) -> None:
        """Leave the process group together: a rank that tears down gloo while a peer is still
        writing its files can abort that peer. Only call this on success; after an error the
        launcher stops the other ranks."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        """This rank's position along the data-parallel dimension: which shard of each batch it takes.
        Tensor-parallel peers (and the stages of one pipeline) share it, so they see the same data."""
        return (self.rank // self.tp) % self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage (its first one, with interleaved schedules)."""
        return self.rank // (self.dp * self.tp)

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1


def degrees(cfg: Config, world: int) -> tuple[int, int, int]:
    """(dp, tp, pp) for ``world`` ranks: --dp defaults to world / (tp x pp); the product must be world.

    ``--strategy tp`` or ``pp`` without its degree gives all ranks (not taken by --dp) to it.
    """
    p = cfg.parallel
    tp, pp = p.tp, p.pp
    if p.strategy == "tp" and tp == 1:
        tp = world // ((p.dp or 1) * pp)
    if p.strategy == "pp" and pp == 1:
        pp = world // ((p.dp or 1) * tp)
    dp = p.dp if p.dp is not None else world // (tp * pp)
    if dp * tp * pp != world or dp < 1:
        raise UsageError(f"--dp {p.dp if p.dp is not None else dp} x --tp {tp} x --pp {pp} = {dp * tp * pp} "
                         f"does not match the {world} ranks (--nnodes x --nproc-per-node); "
                         "the degrees must multiply to the world size")
    return dp, tp, pp


def _attempt_store(rank: int, world: int, timeout: timedelta):
    """After a TorchElastic restart, a store with keys private to this attempt (None otherwise).

    The restarted workers can be handed the same rendezvous store as the failed ones, where
    the dead ranks' gloo addresses are still published under the same keys; a new rank that
    reads one fails to connect. A prefix per attempt keeps the attempts apart.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(f"gpupar/attempt-{attempt}", store)


def launched_by_torchrun() -> bool:
    """True inside a rank started by torchrun / TorchElastic (it sets these variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
