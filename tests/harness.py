"""Running gpupar in real processes: the launcher, torchrun and multi-node paths spawn ranks."""

import os
import subprocess
import sys
import time
from pathlib import Path

from gpupar.launch.elastic import free_port  # noqa: F401  (tests import it from here)

TESTS = Path(__file__).parent


def env() -> dict[str, str]:
    """The test process's environment, with this checkout first on the path: a subprocess run
    in a temporary directory would otherwise import whichever gpupar is installed (an editable
    install of another worktree), not the code under test."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), e.get("PYTHONPATH", "")])
    e.pop("RANK", None)
    return e


def gpupar(*args, cwd, timeout=240, prefix=("-m", "gpupar")) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m gpupar ARGS``; returns the finished process and its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *prefix, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env(), timeout=timeout)
    return proc, time.perf_counter() - start
