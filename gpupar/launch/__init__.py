"""The one orchestrator: every command that trains, predicts or starts ranks enters here.

``run`` does, in this order and only here:

1. ``--plan auto``: gpupar plan picks the layout, which is then checked like any other;
2. every check that needs no rank (``job.preflight``), at the world size this launch will
   have, so a layout that cannot work is one line and exit 2 before anything is written;
3. the run-directory claim (``run.rundir``): one run per directory, for the job's whole life;
4. ``here(topology, run_dir)`` in this process for a one-process layout, or ranks started
   through TorchElastic (``launch.elastic``), each of which re-runs `gpupar COMMAND` and comes
   back here as a rank.

Its collaborators are imported where they are used: ``launch.elastic`` is a low layer that
``job`` also reads (``launched_by_torchrun``), and importing it runs this file.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch

from gpupar.config import Config, layout
from gpupar.config_file import to_toml
from gpupar.errors import TrainingError, UsageError, first_line
from gpupar.launch.collectives import is_timeout, record, watch
from gpupar.launch.elastic import MAX_CPU_RANKS_PER_CORE, launch_plan, launched_by_torchrun, run_workers

Here = Callable[[Any, Any], Any]  # (Topology, RunDir | None) -> result


def run(cfg: Config, command: str, here: Here | None, extra: tuple[str, ...] | list[str] = (), *,
        replicas: bool = False, claim: bool = True, checked: bool = False) -> Any:
    """Run one job of ``command`` and return what ``here`` returned, where it ran in this
    process (None where started ranks ran it).

    ``replicas``: the ranks each do a share of the work (a sweep's models, predict's rows),
    not one layout: the world is --nproc-per-node, every rank a data-parallel replica, and
    the layout checks do not apply. ``claim``: the job writes a run directory
    (``cfg.train.run_dir``), claimed here for its whole life. ``checked``: the caller ran
    ``check`` already (verify checks before its references train). ``extra``: flags for the
    ranks' `gpupar COMMAND` that are not config fields.
    """
    if launched_by_torchrun():  # this process is one rank of a started job
        return _as_rank(cfg, here, replicas, claim)
    if not checked:
        check(cfg, replicas)
    ranks = (cfg.parallel.nproc_per_node or 1) > 1 if replicas else layout(cfg.parallel).ranks
    if not claim:
        if ranks:
            run_workers(cfg, [command, *extra])
            return None
        return here(_single(cfg), None)
    from gpupar.run import rundir
    from gpupar.run.files import atomic_write_text

    path = rundir.default_path(cfg.train.run_dir)
    cfg.train.run_dir = str(path)  # one run directory for all ranks
    # The launcher holds the directory for the life of the job, TorchElastic's restarts included.
    with rundir.claim(path, cfg.checkpoint.resume, cfg.train.overwrite) as run_dir:
        if not ranks:
            return here(_single(cfg), run_dir)
        atomic_write_text(path / "launch.toml", to_toml(cfg))
        try:
            run_workers(cfg, [command, "--config", str(path / "launch.toml"), *extra], run_dir.run_id)
        except TrainingError as exc:
            if run_dir.replaced is None:
                raise
            raise TrainingError(f"{exc}; {run_dir.unchanged()}") from None
    return None


def check(cfg: Config, replicas: bool = False):
    """The checks before anything starts or is written (``job.preflight``) at the world size
    this launch will have, after ``--plan auto`` chose the layout; more than 4 CPU ranks per
    core is a warning, once they passed. Returns the layout's ``ParallelDims``."""
    from gpupar.job import preflight
    from gpupar.topology import ParallelDims

    if replicas:
        _warn_crowded(cfg.parallel.nproc_per_node or 1)
        return ParallelDims.replicas(cfg.parallel.nproc_per_node or 1)
    if cfg.parallel.plan == "auto":  # gpupar plan picks the layout; then it is checked like any other
        from gpupar.plan import apply_auto

        cfg.parallel = apply_auto(cfg).parallel  # in place: the caller's ``here`` holds this cfg
    if not layout(cfg.parallel).ranks:
        if (cfg.parallel.nproc_per_node or 1) > 1:
            raise UsageError(f"--nproc-per-node {cfg.parallel.nproc_per_node} needs a multi-process --strategy, "
                             "for example ddp")
        return preflight(cfg, 1, 1)
    lp = launch_plan(cfg)
    dims = preflight(cfg, lp.nproc_per_node * lp.nnodes, lp.nproc_per_node)
    _warn_crowded(lp.nproc_per_node)
    return dims


def _warn_crowded(ranks: int) -> None:
    cores = os.cpu_count() or 1
    if not torch.cuda.is_available() and ranks > MAX_CPU_RANKS_PER_CORE * cores:
        print(f"gpupar: warning: {ranks} CPU ranks on {cores} cores will crawl (each rank imports "
              "torch and takes a share of the cores)", file=sys.stderr)


def _single(cfg: Config):
    """This process's topology for a one-process layout: one device, layer-split or DataParallel."""
    from gpupar.devices import pick_device
    from gpupar.topology import ParallelDims, Topology

    return Topology.single(pick_device(cfg.train.device), ParallelDims.of(cfg))


def _as_rank(cfg: Config, here: Here | None, replicas: bool, claim: bool) -> Any:
    """One rank of a started job: join the process group, run ``here``, leave together."""
    from gpupar.run import rundir
    from gpupar.topology import ParallelDims, Topology

    if not replicas and not layout(cfg.parallel).ranks:
        raise UsageError(f"{os.environ['WORLD_SIZE']} ranks were launched but the layout runs in one process; "
                         "use --strategy ddp (or another multi-process layout)")
    dims = ParallelDims.replicas(int(os.environ["WORLD_SIZE"])) if replicas else None
    watch()  # stopped by the launcher: say which collectives this rank entered last
    topo = Topology.from_env(cfg, dims)
    try:
        if claim:  # claimed by gpupar's launcher; under an outside torchrun, rank 0 claims it now
            with rundir.for_rank(cfg, topo.is_main) as run_dir:
                result = here(topo, run_dir)
        else:
            result = here(topo, None)
    except BaseException as exc:
        record(f"{type(exc).__name__}: {first_line(exc)}", is_timeout(exc))
        raise
    topo.close()
    _KEPT.append((topo, result))
    return result


_KEPT: list = []
"""What a rank's job leaves behind (its topology and mesh, the parallelised model with its
reducer): referenced until the process ends, since a rank ends with ``os._exit``, which skips
their destructors (gpupar/__main__.py). Dropped earlier, when the caller discards the result,
a gloo process group's C++ destructor could wait on its own threads for ever: a rank that had
written every file hung there in about 1 of 8 runs of two jobs at once."""
