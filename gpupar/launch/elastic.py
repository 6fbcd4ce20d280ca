"""TorchElastic, the rendezvous, SLURM and the loopback stores: how ranks are started.

``run_workers`` re-runs ``python -m gpupar ARGV`` in N worker processes through
``torch.distributed.launcher.api.elastic_launch`` (what torchrun uses); the workers see
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...). A single node rendezvouses on
127.0.0.1; multi-node needs an explicit ``--rdzv-endpoint host:port`` (c10d rendezvous) or a
SLURM allocation. What to start, and when, is the orchestrator's (``gpupar.launch``); this
module imports only the config and the errors.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass

import torch

from gpupar.config import Config
from gpupar.errors import Interrupted, TrainingError, UsageError, first_line
from gpupar.launch.collectives import DIR_ENV, recorder_env, story

SLURM_PORT = 29500
MAX_CPU_RANKS_PER_CORE = 4  # more CPU ranks than this per core is a warning before launch


def launched_by_torchrun() -> bool:
    """True inside a rank started by torchrun / TorchElastic (it sets these variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


@dataclass(frozen=True)
class LaunchPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    endpoint: str  # host:port of the c10d rendezvous store
    local_addr: str | None


def launch_plan(cfg: Config, env: dict[str, str] | None = None) -> LaunchPlan:
    """Resolve node counts, ranks and the rendezvous endpoint from flags, then SLURM, then defaults."""
    env = dict(os.environ if env is None else env)
    p = cfg.parallel
    nproc = p.nproc_per_node
    if nproc is None:
        if not torch.cuda.is_available():
            raise UsageError("ranks on CPU need --nproc-per-node N (the number of ranks to start)")
        nproc = torch.cuda.device_count()
    nnodes, node_rank, endpoint = p.nnodes, p.node_rank, p.rdzv_endpoint
    if "SLURM_JOB_ID" in env and "SLURM_NNODES" in env and nnodes == 1 and endpoint is None:
        nnodes = int(env["SLURM_NNODES"])
        node_rank = int(env.get("SLURM_NODEID", 0)) if node_rank is None else node_rank
        if nnodes > 1:
            endpoint = f"{first_slurm_host(env.get('SLURM_JOB_NODELIST', ''))}:{SLURM_PORT}"
    node_rank = 0 if node_rank is None else node_rank
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank {node_rank} must be in [0, {nnodes}) for --nnodes {nnodes}")
    if nnodes > 1 and endpoint is None:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint host:port (the same on every node)")
    if endpoint is None:
        # Port 0: the rendezvous store binds a free port itself and hands it to the ranks, so
        # two jobs started at once never race for one (a port picked here could be taken first).
        return LaunchPlan(nproc, nnodes, node_rank, "127.0.0.1:0", "127.0.0.1")
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", endpoint):
        raise UsageError(f"--rdzv-endpoint {endpoint!r} must look like host:port, for example 10.0.0.1:29500")
    host = endpoint.rsplit(":", 1)[0]
    if is_loopback(host):
        return LaunchPlan(nproc, nnodes, node_rank, endpoint, host.strip("[]"))
    if nnodes == 1:  # a one-node job has no peer on the network: it must not listen there
        raise UsageError(f"--rdzv-endpoint {endpoint} is not a loopback address; a one-node job rendezvouses on "
                         "loopback (127.0.0.1, localhost, ::1): leave it out, or give --nnodes N for a multi-node job")
    return LaunchPlan(nproc, nnodes, node_rank, endpoint, None)


def is_loopback(host: str) -> bool:
    """True for every spelling of this machine's loopback: localhost, 127.0.0.0/8, ::1, [::1]."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: 'gpu[03-05,7],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UsageError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot find the first host; pass --rdzv-endpoint")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


@contextlib.contextmanager
def own_signal_handlers():
    """Put back this process's SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers after a launch.

    TorchElastic installs its own (they raise its SignalException) and leaves them behind: a
    caller that launched in-process (a notebook's kernel, a test) would get that exception on a
    later Ctrl-C instead of its own interrupt."""
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    handlers = {sig: signal.getsignal(sig) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_workers(cfg: Config, argv: list[str], run_id: str | None = None) -> None:
    """Run ``python -m gpupar ARGV`` in every local rank; raise naming the rank that failed.

    TorchElastic watches the workers: when one raises or dies it stops the others at once,
    and restarts them all up to ``--max-restarts`` times. SIGINT or SIGTERM to this process
    stops every rank (TorchElastic forwards the signal) and raises ``Interrupted``. Each rank
    also dies with this process if it is killed outright (``GPUPAR_LAUNCHER_PID``: see
    gpupar/__main__.py).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lp = launch_plan(cfg)
    # gpupar reports the failing rank itself; TorchElastic's own log lines would repeat it.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):  # its children set their own levels
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=lp.nnodes, max_nodes=lp.nnodes, nproc_per_node=lp.nproc_per_node,
        # Every node of a job must present the same run id to the rendezvous.
        run_id=os.environ.get("SLURM_JOB_ID") or (f"gpupar-{lp.endpoint}" if lp.nnodes > 1
                                                   else f"gpupar-{uuid.uuid4().hex[:8]}"),
        rdzv_backend="c10d", rdzv_endpoint=lp.endpoint,
        rdzv_configs={"rank": lp.node_rank, "join_timeout": max(cfg.parallel.timeout, 30.0),
                      **hosts_store(lp.endpoint, lp.node_rank)},
        max_restarts=cfg.parallel.max_restarts, monitor_interval=0.1, start_method="spawn",
        local_addr=lp.local_addr or route_source(lp.endpoint),
    )
    records = tempfile.mkdtemp(prefix="gpupar-collectives-")  # where a failing rank writes its last collectives
    handed = {"GPUPAR_LAUNCHER_PID": str(os.getpid()), **({"GPUPAR_RUN_ID": run_id} if run_id else {}),
              DIR_ENV: records,
              **{k: v for k, v in recorder_env().items() if k not in os.environ}}
    loopback = lp.local_addr is not None and is_loopback(lp.local_addr)  # reachable from this machine only
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ and loopback_interface():
        handed["GLOO_SOCKET_IFNAME"] = loopback_interface()  # gloo's own sockets: not the hostname's address
    saved = {k: os.environ.get(k) for k in handed}
    os.environ.update(handed)  # the workers inherit this process's environment
    try:
        with own_signal_handlers(), loopback_stores() if loopback else contextlib.nullcontext():
            elastic_launch(config, sys.executable)("-u", "-m", "gpupar", *argv)
    except SignalException as exc:  # the agent stopped every worker with the same signal
        raise Interrupted(int(exc.sigval)) from None
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        causes = {r: f for r, f in exc.failures.items() if f.exitcode != 3} or exc.failures
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        if failure.exitcode < 0 and failure.signal_name() == "SIGTERM" and len(causes) < len(exc.failures):
            # Stopped by the launcher after its peers gave up on it: the stuck rank.
            how += f"; its peers timed out waiting for it after --timeout {cfg.parallel.timeout:g}s"
        stuck = story(records, lp.nproc_per_node)
        raise TrainingError(f"rank {rank} failed ({how}) after {cfg.parallel.max_restarts} restart(s); "
                            "the other ranks were stopped" + (f"; {stuck}" if stuck else "")) from None
    except Exception as exc:  # rendezvous timeouts and the like
        if type(exc).__module__.startswith("torch.distributed"):
            detail = first_line(exc, "no detail")
            raise TrainingError(f"launch failed at rendezvous {lp.endpoint} ({lp.nnodes} node(s), "
                                f"--timeout {cfg.parallel.timeout:g}s): {type(exc).__name__}: {detail}") from None
        raise
    finally:
        shutil.rmtree(records, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def root_cause(failures: dict) -> tuple[int, object]:
    """The rank that failed first in cause, not in time. TorchElastic's timestamps have one
    second's resolution and it stops the surviving ranks itself (SIGTERM) as soon as one fails,
    so the cause is ranked by kind: a rank that exited with its own error (exit 1, 2) first,
    then one killed by another signal (SIGKILL, SIGSEGV, SIGABRT), then one stopped by the
    launcher (SIGTERM, or exit 130/143 after an interrupt), and last one whose collective
    broke because a peer died (PEER_FAILED, exit 3); ties go to the earlier, then lower rank.
    """
    def kind(code: int) -> int:
        if code > 0 and code not in (3, 130, 143):
            return 0
        if code < 0 and -code not in (signal.SIGTERM, signal.SIGINT):
            return 1
        return 2 if code != 3 else 3

    return min(failures.items(), key=lambda kv: (kind(kv[1].exitcode), kv[1].timestamp, kv[0]))


def hosts_store(endpoint: str, node_rank: int = 0) -> dict:
    """``{"is_host": True}`` on the node whose address the endpoint is: it serves the rendezvous
    store. TorchElastic guesses from the hostname, and guesses wrong where the hostname resolves
    to 127.0.0.1 or another interface's address; empty where the endpoint is not resolvable."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    if is_loopback(host):  # only this machine can reach it: its first node serves it
        return {"is_host": node_rank == 0}
    try:
        address = socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return {}
    source = route_source(endpoint)
    return {} if source is None else {"is_host": source == address}


def route_source(endpoint: str) -> str | None:
    """This host's address on the route to the rendezvous ``host:port``: the address the other
    nodes can reach this one at. TorchElastic would otherwise advertise whatever the hostname
    resolves to, which on many machines is 127.0.0.1 (the first node's store then looks local
    to every node). A UDP connect sends nothing; it only picks the route."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        family = socket.getaddrinfo(host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None  # unresolvable here: TorchElastic's default


def loopback_interface() -> str | None:
    """The name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    except OSError:
        return None


@contextlib.contextmanager
def loopback_stores():
    """A single-node job must not be reachable from the network. TorchElastic's key-value
    stores (the rendezvous store, and the one the ranks share) are ``TCPStore`` servers, which
    bind every interface whatever host they are given; TCPStore can instead serve on a socket
    it is handed (``master_listen_fd``). While the launcher starts its ranks, a store server
    for a loopback host (any spelling: ``is_loopback``) gets a socket bound to that address
    only; clients are unchanged."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    original = dist.TCPStore

    class LoopbackTCPStore(original):
        def __init__(self, host_name, port, *args, is_master=False, master_listen_fd=None, **kwargs):
            if is_master and master_listen_fd is None and is_loopback(host_name):
                host = "127.0.0.1" if host_name.lower() == "localhost" else host_name.strip("[]")
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, port))
                    sock.listen(1024)
                    master_listen_fd = sock.detach()  # the store owns (and closes) it now
                except OSError:  # the port is taken: let TCPStore say so as it always does
                    sock.close()
            super().__init__(host_name, port, *args, is_master=is_master, master_listen_fd=master_listen_fd,
                             **kwargs)

    modules = (dist, c10d_rendezvous_backend)
    for module in modules:
        module.TCPStore = LoopbackTCPStore
    try:
        yield
    finally:
        for module in modules:
            module.TCPStore = original
