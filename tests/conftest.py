import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # user_models.py is importable as --model user_models:factory


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
