"""Start N ranks from inside a Jupyter notebook: ``gpupar.notebook_launch(fn, *args, nproc=N)``.

A notebook cannot run ``torchrun``: the training function lives in the kernel's memory,
not in a file a new interpreter could import. So, like Accelerate's ``notebook_launcher``,
this calls TorchElastic's launcher API (``elastic_launch``, what torchrun uses) with the
Python function itself as the entrypoint and the ``fork`` start method: each rank is a
copy of the kernel, so functions, imports and variables defined in earlier cells are
there. Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so the function calls ``torch.distributed.init_process_group()`` (or
``gpupar.topology.Topology.from_env(cfg)``) as under torchrun. Forked ranks compute on one
CPU thread each (see ``_run_rank``).

Fork and CUDA: a forked child cannot use a CUDA context made by its parent, so with
``fork`` nothing in the notebook may create a CUDA tensor before the launch (gpupar refuses
then), and ``torch.cuda.is_available()`` should be called with
``PYTORCH_NVML_BASED_CUDA_CHECK=1`` set, which keeps it from poisoning fork (PyTorch's
``torch.cuda.is_available`` docs). ``start_method="spawn"`` works for functions importable
from a module (not for ones defined in the notebook).
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any, Callable

import torch

from gpupar.errors import TrainingError, UsageError
from gpupar.launch.elastic import own_signal_handlers

START_METHODS = ("fork", "spawn", "forkserver")


def notebook_launch(fn: Callable[..., Any], *args: Any, nproc: int = 2, start_method: str = "fork",
                    timeout: float = 120.0) -> Any:
    """Run ``fn(*args)`` on ``nproc`` local ranks and return rank 0's result.

    If a rank raises or dies, TorchElastic stops the others, and this raises a TrainingError
    naming the first failing rank and its exception. ``timeout`` bounds the rendezvous.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise UsageError(f"nproc={nproc!r} must be a positive integer (the number of ranks to start)")
    if start_method not in START_METHODS:
        raise UsageError(f"start_method={start_method!r} is not one of: {', '.join(START_METHODS)}")
    if start_method == "fork" and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise UsageError("CUDA was initialised in this notebook before notebook_launch: forked ranks cannot use it; "
                         "restart the kernel and create no CUDA tensor before the launch")
    # The failures are reported here in one line; TorchElastic's own log lines would repeat them.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    endpoint = "127.0.0.1:0"  # the rendezvous store binds a free port itself: no race for one
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"notebook-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=endpoint,
                          rdzv_configs={"join_timeout": max(timeout, 30.0)}, max_restarts=0,
                          monitor_interval=0.1, start_method=start_method, local_addr="127.0.0.1")
    _flush()
    try:
        with own_signal_handlers():  # the kernel's interrupt stays the kernel's
            results = elastic_launch(config, _run_rank)(fn, start_method == "fork", *args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise TrainingError(f"rank {rank} failed: {_failure_line(failure)}; the other ranks were stopped") from None
    finally:
        _flush()
    return results[0]


def _run_rank(fn: Callable[..., Any], forked: bool, *args: Any) -> Any:
    """One rank: ``fn(*args)``, with its prints flushed before the rank exits.

    A forked rank runs CPU ops on one thread: the OpenMP thread pool the kernel already
    used does not survive fork, and a child that enters a parallel region hangs (torchrun
    likewise defaults to OMP_NUM_THREADS=1 per rank).
    """
    if forked:
        torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        _flush()


def _failure_line(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()}"
    # TorchElastic records a function entrypoint's exception as {"message": "Type: text", ...}.
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
    message = message.strip().splitlines()[0] if message.strip() else ""
    if not message or message.startswith("To enable traceback"):
        return f"exit code {failure.exitcode}"
    return message


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or detached stream in some notebook frontends
            pass
