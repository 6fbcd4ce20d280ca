"""Issue 26, the runtime half: loopback means loopback for every spelling."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.launch.elastic import hosts_store, is_loopback, launch_plan
from harness import env, free_port


def test_every_spelling_of_loopback_is_loopback_and_a_one_node_job_refuses_any_other():
    for host in ("127.0.0.1", "127.0.0.2", "127.255.0.9", "localhost", "LOCALHOST", "::1", "[::1]"):
        assert is_loopback(host), host
        assert hosts_store(f"{host}:29500") == {"is_host": True}  # this node serves the store
    for host in ("0.0.0.0", "::", "[::]", "10.0.0.1", "example.com", "128.0.0.1", "::ffff:10.0.0.1"):
        assert not is_loopback(host), host
    cfg = Config()
    cfg.parallel.nproc_per_node = 2
    for endpoint, addr in (("[::1]:29500", "::1"), ("127.0.0.2:29500", "127.0.0.2"), ("localhost:1", "localhost")):
        cfg.parallel.rdzv_endpoint = endpoint
        assert launch_plan(cfg, {}).local_addr == addr
    cfg.parallel.rdzv_endpoint = "0.0.0.0:29500"
    with pytest.raises(UsageError, match="not a loopback address; .* --nnodes N"):
        launch_plan(cfg, {})
    cfg.parallel.nnodes, cfg.parallel.node_rank = 2, 0  # the multi-node flags allow a network bind
    assert launch_plan(cfg, {}).local_addr is None


def _tree(pid: int) -> list[int]:
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [pid] + [q for k in kids for q in _tree(k)]


@pytest.mark.skipif(shutil.which("ss") is None or not Path("/proc/self/task").is_dir(), reason="needs ss and /proc")
def test_an_ipv6_loopback_endpoint_listens_on_loopback_only(tmp_path):
    """`--rdzv-endpoint [::1]:PORT`: the launcher's stores and the ranks' sockets all listen on
    a loopback address (ss -ltnp), never on every interface."""
    proc = subprocess.Popen([sys.executable, "-m", "gpupar", "train", "--strategy", "ddp", "--nproc-per-node", "2",
                             "--samples", "64", "--epochs", "100000000", "--log-every", "100000000",
                             "--rdzv-endpoint", f"[::1]:{free_port()}", "--run-dir", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env())
    try:
        assert "Using device: cpu x 2 ranks" in proc.stdout.readline(), proc.stderr.read()
        pids = _tree(proc.pid)
        lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
        mine = [line.split()[3] for line in lines if any(f"pid={p}," in line for p in pids)]
        assert len(mine) >= 3, lines  # the rendezvous store, the ranks' store, gloo's listeners
        assert all(a.startswith(("[::1]:", "127.")) for a in mine), mine
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
