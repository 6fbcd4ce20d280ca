"""Running gpupar in real processes: the launcher, torchrun and multi-node paths spawn ranks."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


TESTS = Path(__file__).parent


def free_port() -> int:
    """A port free now (for the tests that name an endpoint themselves; gpupar binds port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    # This checkout first: an editable install elsewhere (another worktree) must not be what runs.
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), e.get("PYTHONPATH", "")])
    e.pop("RANK", None)
    return e


def gpupar(*args, cwd, timeout=240, prefix=("-m", "gpupar")) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m gpupar ARGS``; returns the finished process and its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *prefix, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env(), timeout=timeout)
    return proc, time.perf_counter() - start
