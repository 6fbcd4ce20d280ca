"""The one topology object: who this process is, on which device, and how ranks are arranged.

Like torchtitan's ``ParallelDims``, the layout is four degrees whose product is the world
size: ``pp`` (pipeline stages), ``dp_replicate`` and ``dp_shard`` (data parallel: DDP
replicates, FSDP shards, HSDP does both) and ``tp`` (tensor parallel). They are laid out as
one named ``DeviceMesh`` over the dimensions ``("pp", "dp_replicate", "dp_shard", "tp")``,
keeping only those of size > 1. ``tp`` is innermost: tensor-parallel peers are consecutive
ranks (the same node, the fastest links), as in Megatron-LM and torchtitan. Rank r sits at
``pp_rank = r // (dp*tp)``, ``dp_rank = (r // tp) % dp``, ``tp_rank = r % tp``, with
``dp = dp_replicate * dp_shard``.

It is built once per process (``Topology.single`` or ``Topology.from_env`` after the
launcher started the ranks), validated, and passed explicitly to the strategies and the
training loop. Nothing reaches for it through a global.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gpupar.config import Config, Layout, layout
from gpupar.devices import backend_for, pick_device
from gpupar.errors import UsageError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def leave_at_exit() -> None:
    """For a process group gpupar joined on a user's behalf (``gpupar.train`` or
    ``gpupar.setup()`` under torchrun): a script that returns without destroying it would
    tear down gloo's worker threads at interpreter exit, which aborts the rank with SIGABRT
    ("terminate called without an active exception", pytorch/pytorch#190489) after its work
    is done. At exit the ranks meet once (bounded by the group's timeout) so none closes its
    sockets under a peer still writing, then leave the group. A rank that dies of an exception
    (``sys.last_value``) leaves it as it is: the launcher sees the failure at once and stops
    its peers, rather than after a barrier they may never reach. The CLI's ranks close
    explicitly and exit through ``os._exit``."""
    def leave() -> None:
        if not dist.is_initialized() or getattr(sys, "last_value", None) is not None:
            return
        try:
            dist.barrier()
        except Exception:  # a peer already gone: leave anyway, nothing to wait for
            pass
        dist.destroy_process_group()

    atexit.register(leave)


@dataclass(frozen=True)
class ParallelDims:
    """The layout of one run, resolved once: its degrees (their product is the world size),
    how it runs, and how many micro-batches a pipeline step takes."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    process: str = "one-device"
    """"ranks" (one process per rank), or a one-process layout: "one-device", "dataparallel",
    "layer-split" (``config.Layout.process``)."""
    microbatches: int = 1
    """Micro-batches per pipeline step: --microbatches, by default 2 x pp (1 without a pipeline)."""

    @classmethod
    def of(cls, cfg: Config, world: int = 1, ranks_per_node: int = 1) -> "ParallelDims":
        """The layout ``cfg`` asks for at ``world`` ranks: the one place it is resolved."""
        lay = layout(cfg.parallel)
        if not lay.ranks:
            return cls(process=lay.process)
        dims = cls.resolve(lay, world, ranks_per_node)
        pp_micro = cfg.parallel.microbatches or 2 * dims.pp
        return dataclasses.replace(dims, process="ranks", microbatches=pp_micro if dims.pp_enabled else 1)

    @classmethod
    def resolve(cls, lay: Layout, world: int, ranks_per_node: int) -> "ParallelDims":
        """Concrete degrees for ``world`` ranks: the one degree left open takes what the others leave."""
        given = {"--dp": lay.dp, "--tp": lay.tp, "--pp": lay.pp}
        fixed = math.prod(v for v in given.values() if v is not None)
        open_ = [k for k, v in given.items() if v is None]
        degrees = {k: (world // fixed if v is None else v) for k, v in given.items()}
        if math.prod(degrees.values()) != world or min(degrees.values()) < 1:
            shown = " x ".join(f"{k} {degrees[k] if k not in open_ else '?'}" for k in given)
            raise UsageError(f"{shown} cannot fill the {world} ranks (--nnodes x --nproc-per-node); the degrees "
                             f"must multiply to the world size" + (f" ({open_[0]} takes the ranks the others "
                                                                   "leave)" if open_ else ""))
        dp, tp, pp = degrees["--dp"], degrees["--tp"], degrees["--pp"]
        if lay.dp_mode == "replicate":
            return cls(pp, dp, 1, tp)
        if lay.dp_mode == "shard":
            return cls(pp, 1, dp, tp)
        local_dp = ranks_per_node // (tp * pp) if ranks_per_node % (tp * pp) == 0 else dp
        replicate, shard = hsdp_degrees(dp, lay.dp_replicate, lay.dp_shard, max(local_dp, 1))
        if shard == 1 and dp > 1 and tp * pp > 1:
            raise UsageError("--strategy hsdp with --dp-shard 1 beside --tp/--pp only replicates, which "
                             "DDP cannot do for model-parallel layers; use --strategy fsdp")
        return cls(pp, replicate, shard, tp)

    @classmethod
    def replicas(cls, world: int) -> "ParallelDims":
        """``world`` ranks that each do a share of the work (a sweep's models, predict's rows)."""
        return cls(dp_replicate=world, process="ranks")

    @property
    def degrees(self) -> tuple[int, int, int, int]:
        """(pp, dp_replicate, dp_shard, tp), in the mesh's order."""
        return self.pp, self.dp_replicate, self.dp_shard, self.tp

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks split each global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded (FSDP, or HSDP when dp_replicate > 1 too)."""
        return self.dp_shard > 1

    @property
    def ddp_enabled(self) -> bool:
        """Whole replicas with all-reduced gradients (``resolve`` allows it only without tp/pp)."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def grads_replicated(self) -> bool:
        """Every rank holds every whole gradient after backward (one device or DDP)."""
        return not (self.fsdp_enabled or self.tp_enabled or self.pp_enabled)

    def describe(self, schedule: str = "") -> str:
        """What runs, for the start line: ``fsdp(dp=2) x tp(2)``, ``pp(2, 1f1b) x hsdp(2x2)``."""
        parts = []
        if self.pp_enabled:
            parts.append(f"pp({self.pp}{', ' + schedule if schedule else ''})")
        if self.fsdp_enabled and self.dp_replicate > 1:
            parts.append(f"hsdp(replicate={self.dp_replicate}, shard={self.dp_shard})")
        elif self.fsdp_enabled:
            parts.append(f"fsdp(dp={self.dp_shard})")
        elif self.ddp_enabled:
            parts.append(f"ddp(dp={self.dp_replicate})")
        if self.tp_enabled:
            parts.append(f"tp({self.tp})")
        return " x ".join(parts) or "single"

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """One named mesh over the dimensions of size > 1 (None when every degree is 1)."""
        dims = [(name, size) for name, size in zip(MESH_DIMS, self.degrees) if size > 1]
        if not dims:
            return None
        names, sizes = zip(*dims)
        return init_device_mesh(device_type, sizes, mesh_dim_names=names)


def hsdp_degrees(world: int, replicate: int | None, shard: int | None, local_world: int) -> tuple[int, int]:
    """(R, S) with R * S == world data-parallel ranks. Unset degrees follow the other one;
    with neither set, shard within a node (S = its data-parallel ranks) and replicate across nodes."""
    if replicate is None and shard is None:
        shard = local_world if world % local_world == 0 else world
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for name, value in (("--dp-replicate", replicate), ("--dp-shard", shard)):
        if value is not None and value not in divisors:
            raise UsageError(f"{name} {value} does not divide the {world} data-parallel ranks; "
                             f"accepted: {', '.join(map(str, divisors))}")
    replicate = replicate or world // shard  # type: ignore[operator]
    shard = shard or world // replicate
    if replicate * shard != world:
        raise UsageError(f"--dp-replicate {replicate} x --dp-shard {shard} = {replicate * shard} must equal "
                         f"the {world} data-parallel ranks")
    return replicate, shard


@dataclass(frozen=True)
class Topology:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dims: ParallelDims = ParallelDims()
    mesh: DeviceMesh | None = None
    """The named mesh over the dimensions of size > 1; None in a single process."""

    @classmethod
    def single(cls, device: torch.device, dims: ParallelDims = ParallelDims()) -> "Topology":
        """This process alone on ``device`` (``dims``: a one-process layout, layer-split or DataParallel)."""
        return cls(device=device, dims=dims)

    @classmethod
    def from_env(cls, cfg: Config, dims: ParallelDims | None = None) -> "Topology":
        """Join the process group that torchrun / TorchElastic set up for this rank.

        Each rank takes cuda:LOCAL_RANK on GPUs (NCCL) or the CPU (gloo). The process-group
        timeout bounds every collective, so a dead or stuck peer fails the job instead of
        hanging it. ``dims`` replaces the layout's degrees (a sweep's ranks each train models of their own).
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
        dims = dims or ParallelDims.of(cfg, world, local_world)
        if not dist.is_initialized():
            timeout = timedelta(seconds=cfg.parallel.timeout)
            dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=timeout,
                                    store=_attempt_store(rank, world, timeout))
            leave_at_exit()
        return cls(device=device, rank=rank, local_rank=local_rank, world_size=world, dims=dims,
                   mesh=dims.build_mesh(device.type))

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
    def dp(self) -> int:
        return self.dims.dp

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp_rank(self) -> int:
        """This rank's position along the data-parallel dimensions: which shard of each batch it takes.
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
        return self.dims.tp_enabled

    @property
    def pp_enabled(self) -> bool:
        return self.dims.pp_enabled

    @property
    def dp_enabled(self) -> bool:
        return self.dims.dp_enabled

    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel part of the mesh: 1-D ("dp_shard") for FSDP, 2-D for HSDP."""
        assert self.mesh is not None
        return self.mesh["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.mesh["dp_shard"]

    def merge_on_main(self, part: dict) -> dict | None:
        """Every rank's dict merged on rank 0 (None elsewhere): pipeline stages each hold part
        of a model's names. A collective: every rank calls it."""
        parts: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(part, parts, dst=0)
        if not self.is_main:
            return None
        merged: dict = {}
        for each in parts:  # type: ignore[union-attr]
            merged.update(each)
        return merged

    def comm_device(self) -> torch.device:
        """Where small tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


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
