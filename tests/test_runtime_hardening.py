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


def test_the_launcher_names_the_collective_a_stuck_job_waited_in(tmp_path):
    """The ranks' records (what each wrote on failure or when stopped) in words: the rank that
    timed out, its collective, the ranks that never entered it, the last one all finished.
    The spawned check (a rank that sleeps before its all-reduce) is in test_ddp.py."""
    import json

    from gpupar.launch.collectives import story

    def entry(seq: int, op: str = "gloo:all_reduce", group: str = "default_pg") -> dict:
        return {"op": op, "group": group, "seq": seq, "sizes": [[11]], "state": "scheduled"}

    def write(rank: int, seqs, timed_out=False, attempt=0, how="stopped by the launcher") -> None:
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps(
            {"rank": rank, "attempt": attempt, "how": how, "timed_out": timed_out, "entries": [entry(s) for s in seqs]}))

    assert story(tmp_path, 2) == ""  # no records (an older torch): the launcher's line as before
    write(0, [8, 9, 10], timed_out=True, how="RuntimeError: Timed out waiting 5000ms")
    assert story(tmp_path, 2).startswith("rank 0 timed out in gloo:all_reduce #10 of process group default_pg")
    assert "every rank finished" not in story(tmp_path, 2)  # rank 1 left no record (SIGKILL): not claimed
    write(1, [8, 9])
    text = story(tmp_path, 2)
    assert "; rank 1 never entered it (its last collective: gloo:all_reduce #9 of process group default_pg; " \
           "stopped by the launcher)" in text
    assert text.endswith("the last collective every rank finished: gloo:all_reduce #9 of process group default_pg")
    write(1, [8, 9, 10])  # both in #10, rank 1 stopped in it: no one is named as missing it
    assert "never entered" not in story(tmp_path, 2)
    write(1, [1], attempt=1)  # a later attempt's records replace the earlier attempt's
    assert story(tmp_path, 2) == ""
    (tmp_path / "rank-0.json").write_text("[" * 100000)  # a hostile record is skipped, never a traceback
    assert story(tmp_path, 2) == ""
