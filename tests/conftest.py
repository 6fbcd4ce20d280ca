import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # user_models.py is importable as --model user_models:factory
# Every process a test starts (ranks, CLIs, scripts) imports this checkout's gpupar, not an
# editable install of another worktree, and finds tests/user_models.py.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH")]))
# One intra-op thread in every process: the tests' models are tiny, where a second OpenMP thread
# only spins (it doubled the CPU time of a one-device run), and pytest-xdist already runs one
# test per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def gpupar(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from gpupar.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def gpupar_cli(gpupar):
    """The in-process CLI, under a name that does not clash with harness.gpupar (subprocesses)."""
    return gpupar


@pytest.fixture(autouse=True)
def signal_handlers_are_left_as_found():
    """A test (or gpupar's in-process launcher) that leaves its own SIGINT/SIGTERM handler
    behind breaks every later test that signals this process: fail the test that leaked it."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    leaked = {sig.name: handler for sig in before if (handler := signal.getsignal(sig)) is not before[sig]}
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not leaked, f"the test left signal handlers installed: {leaked}"
