"""`gpupar run script.py`: any script in N ranks, through the one orchestrator
(``launch.run``: TorchElastic, loopback rendezvous, the failing rank named, exit 1/2/130/143).
Each rank re-runs `gpupar run ...` and lands here as a rank, where it runs the script."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.launch.elastic import launched_by_torchrun
from gpupar.ownloop import STRATEGY_ENV, record


def run_script(cfg: Config, script: str, script_args: list[str], argv: list[str]) -> int:
    """Run ``script`` here (one rank, or one process) or start the ranks that will."""
    from gpupar import launch

    if not Path(script).is_file():
        raise UsageError(f"gpupar run {script}: no such script")
    if cfg.parallel.strategy != "single":
        os.environ[STRATEGY_ENV] = cfg.parallel.strategy  # the ranks' gpupar.setup reads it
    if launched_by_torchrun() or (cfg.parallel.nproc_per_node or 1) == 1:
        return execute(script, script_args)
    launch.run(cfg, "run", None, argv, replicas=True, claim=False)
    return 0


def execute(script: str, script_args: list[str]) -> int:
    """The script as `python script.py args` runs it: as __main__, with its folder on sys.path."""
    sys.argv = [script, *script_args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        record.flush()  # before the rank leaves: its atexit handlers run after that
    return 0
