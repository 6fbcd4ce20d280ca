"""Issue 14: a run directory belongs to one run, a failure leaves the earlier files as they
were, and a job stops cleanly (signals, a killed launcher, a single node reachable only on
loopback). In-process where one process shows it; one spawned job for what needs ranks."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupar.run import files, rundir

from harness import env

TRAIN = ("train", "--samples", 64, "--batch-size", 16)
FULL = ("train", "--samples", 64)  # one step per epoch


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run, byte for byte (the lock file holds only the last holder's pid)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


def steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())


def one_line(err: str, start: str, *needles: str) -> None:
    assert len(err.strip().splitlines()) == 1 and err.startswith(start), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_refused_or_failed_run_leaves_the_earlier_run_intact(gpupar, tmp_path, monkeypatch):
    """Why 1: a rejected, a NaN, a disk-full and a read-only run on RD each leave its files
    byte-identical (and say so in one line), and predict still reads its model."""
    rd, nan = tmp_path / "RD", ("--model", "user_models:goes_nan")  # NaN from its 6th forward pass
    assert gpupar(*TRAIN, *nan, "--epochs", 1, "--checkpoint-every", 4, "--run-dir", rd)[0] == 0
    before = run_files(rd)
    # Rejected by the checks: nothing is written, not even the lock file's holder.
    code, _, err = gpupar(*TRAIN, "--hidden", 60, "--batch-size", 5000, "--run-dir", rd)
    one_line(err, "gpupar: error: ", "--batch-size 5000")
    # A valid new run is refused: the directory holds a finished run.
    code, _, err = gpupar(*TRAIN, "--hidden", 60, "--run-dir", rd)
    assert code == 2
    one_line(err, "gpupar: error: ", f"--run-dir {rd} holds a finished run", "--resume auto", "--overwrite")
    # --resume continues it; a non-finite loss stops it before it writes anything.
    code, _, err = gpupar(*TRAIN, *nan, "--epochs", 3, "--resume", "auto", "--run-dir", rd)
    assert code == 1
    one_line(err, "gpupar: training failed: ", "non-finite", f"the earlier files in {rd}", "are unchanged")
    # A full disk, then a read-only directory, while the results are written at the end.
    for failure in (OSError(errno.ENOSPC, "No space left on device"), PermissionError(errno.EACCES, "Permission denied")):
        real = files.tempfile.mkstemp

        def mkstemp(*args, _failure=failure, **kwargs):
            if kwargs.get("prefix", "").startswith(".summary.json"):  # the others are written by then
                raise _failure
            return real(*args, **kwargs)

        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
        code, _, err = gpupar(*TRAIN, *nan, "--epochs", 2, "--resume", "auto", "--run-dir", rd)
        monkeypatch.undo()
        assert code == 1
        one_line(err, "gpupar: training failed: ", failure.strerror, "are unchanged")
        assert not [p for p in rd.iterdir() if p.name.endswith(".tmp")]  # no stray temporary file
        now = run_files(rd)
        assert {k: v for k, v in now.items() if "checkpoints" not in k} == \
               {k: v for k, v in before.items() if "checkpoints" not in k}
    assert run_files(rd).keys() >= before.keys()
    # --overwrite by a run that fails: the run it was to replace is moved aside whole, not deleted.
    kept = run_files(rd)
    code, _, err = gpupar(*TRAIN, *nan, "--epochs", 3, "--overwrite", "--run-dir", rd)
    assert code == 1
    one_line(err, "gpupar: training failed: ", "non-finite", "no results were written; the run it was to "
             f"replace is kept in {rd}/.replaced-")
    aside = next(rd.glob(".replaced-*"))
    assert run_files(aside) == kept and not (rd / "model.safetensors").exists()
    (aside / "model.safetensors").rename(rd / "model.safetensors")  # what a user can do to get it back
    header = ",".join(f"f{i}" for i in range(10))  # its own name per column: duplicates are refused
    (tmp_path / "x.csv").write_text("\n".join([header] + [",".join(["0.5"] * 10)] * 3) + "\n")
    code, _, err = gpupar("predict", "--weights", rd / "model.safetensors", "--data", tmp_path / "x.csv",
                          "--out", tmp_path / "p.csv", "--model", "user_models:goes_nan")
    assert code == 0, err


def test_keep_last_prunes_only_this_runs_checkpoints(gpupar, tmp_path):
    """Why 2: a second run on CK is refused, --overwrite replaces the first one; a resumed run
    keeps its id and prunes its own checkpoints only, never another run's."""
    ck = tmp_path / "CK"
    assert gpupar(*FULL, "--epochs", 6, "--checkpoint-every", 2, "--run-dir", ck)[0] == 0
    code, _, err = gpupar(*FULL, "--epochs", 3, "--hidden", 60, "--checkpoint-every", 1, "--run-dir", ck)
    assert code == 2 and "holds a finished run" in err and steps(ck) == [2, 4, 6]
    assert gpupar(*FULL, "--epochs", 3, "--hidden", 60, "--checkpoint-every", 1, "--keep-last", 2,
                  "--run-dir", ck, "--overwrite")[0] == 0
    assert steps(ck) == [2, 3]  # the first run's step-4 and step-6 went with --overwrite
    assert not list(ck.glob(".replaced-*"))  # deleted once the new run had committed its results
    first = json.loads((ck / "checkpoints/step-3/trainer.json").read_text())["run_id"]
    # Another run's checkpoint in the directory (as an older gpupar left it): not ours to prune.
    foreign = ck / "checkpoints/step-1"
    (ck / "checkpoints/step-2").rename(foreign)
    trainer = json.loads((foreign / "trainer.json").read_text())
    (foreign / "trainer.json").write_text(json.dumps({**trainer, "run_id": "other"}))
    assert gpupar(*FULL, "--epochs", 6, "--hidden", 60, "--checkpoint-every", 1, "--keep-last", 2,
                  "--resume", "auto", "--run-dir", ck)[0] == 0
    assert steps(ck) == [1, 5, 6]
    assert json.loads((ck / "checkpoints/step-6/trainer.json").read_text())["run_id"] == first
    assert json.loads((ck / "summary.json").read_text())["run_id"] == first


def test_a_held_run_directory_is_refused_naming_its_holder(gpupar, tmp_path):
    """Why 3: the lock is exclusive for the life of the run; the second run exits 2 naming the
    first (its pid and command) and writes nothing; once released the directory is free."""
    rd = tmp_path / "RD"
    with rundir.claim(rd, None, False, command="gpupar train --run-dir RD") as held:
        assert held.lock_fd is not None
        code, _, err = gpupar(*TRAIN, "--epochs", 1, "--run-dir", rd)
        assert code == 2
        one_line(err, "gpupar: error: ", f"--run-dir {rd} is in use by a running gpupar "
                                         f"(pid {os.getpid()}: gpupar train --run-dir RD)")
        assert sorted(p.name for p in rd.iterdir()) == [rundir.LOCK]
    assert gpupar(*TRAIN, "--epochs", 1, "--run-dir", rd)[0] == 0


def test_sigterm_stops_the_run_with_143_and_keeps_no_half_checkpoint(gpupar, tmp_path):
    """`kill PID` mid-run: one line, exit 143; every checkpoint left is complete, and no results."""
    rd = tmp_path / "RD"
    code, out, err = gpupar(*TRAIN, "--epochs", 50, "--model", "user_models:terms_itself",
                            "--checkpoint-every", 1, "--run-dir", rd)
    assert (code, err) == (143, "gpupar: interrupted\n")
    assert not (rd / "summary.json").exists() and not (rd / "model.safetensors").exists()
    for step in (rd / "checkpoints").iterdir():
        assert (step / "COMPLETE").exists() or step.name.endswith(".tmp"), step
    assert signal.getsignal(signal.SIGTERM) is not None  # main() put the previous handler back


def test_the_root_cause_rank_is_named_whatever_the_timing():
    """TorchElastic's failure timestamps have one second's resolution and it stops the other
    ranks itself: the rank that raised must win over one stopped (SIGTERM) or whose collective
    broke (exit 3) in the same second or earlier; a SIGKILLed rank over the launcher's SIGTERM."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from gpupar.launch.elastic import root_cause

    def failure(rank: int, code: int, when: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
        f.timestamp = when
        return f

    sigterm, sigkill = -signal.SIGTERM, -signal.SIGKILL
    cases = [({0: (sigterm, 5), 1: (1, 5)}, 1), ({0: (sigterm, 4), 1: (1, 5)}, 1), ({0: (3, 4), 1: (1, 5)}, 1),
             ({0: (3, 5), 1: (sigkill, 5)}, 1), ({0: (143, 4), 1: (sigkill, 5)}, 1), ({0: (3, 5), 1: (sigterm, 5)}, 1),
             ({0: (1, 5), 1: (1, 5)}, 0), ({0: (2, 6), 1: (1, 5)}, 1)]
    for failures, expected in cases:
        rank, _ = root_cause({r: failure(r, code, when) for r, (code, when) in failures.items()})
        assert rank == expected, failures


def _listening(pids: list[int]) -> list[str]:
    """The local addresses the processes ``pids`` listen on (TCP, IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                addr, port = fields[1].split(":")
                host = bytes.fromhex(addr)[::-1] if len(addr) == 8 else bytes.fromhex(addr)
                found.append(f"{'.'.join(map(str, host)) if len(addr) == 8 else host.hex()}:{int(port, 16)}")
    return found


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads sockets and children from Linux /proc")
def test_a_ddp_job_listens_on_loopback_stops_on_ctrl_c_and_dies_with_its_launcher(tmp_path):
    """One DDP job on one node: every socket of the launcher and its ranks listens on
    127.0.0.1 only; SIGINT (Ctrl-C) stops every rank, prints `gpupar: interrupted`, exits 130.
    A second job: kill -9 of its launcher takes both ranks down within 5 s."""
    def start(name: str) -> tuple[subprocess.Popen, list[int]]:
        proc = subprocess.Popen([sys.executable, "-m", "gpupar", "train", "--strategy", "ddp", "--nproc-per-node", "2",
                                 "--samples", "64", "--epochs", "1000000", "--log-every", "1000000",
                                 "--checkpoint-every", "40", "--run-dir", str(tmp_path / name)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env())
        assert "Using device: cpu x 2 ranks" in proc.stdout.readline()  # rank 0 is up, so is the rendezvous
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        return proc, ranks

    proc, ranks = start("int")
    addresses = _listening([proc.pid, *ranks])
    assert len(addresses) >= 3 and all(a.startswith("127.0.0.1:") for a in addresses), addresses
    # Wait for the first committed checkpoint, however long a loaded machine takes (a fixed
    # deadline raced the load: SIGINT before any commit left no checkpoints to inspect).
    while not list((tmp_path / "int").glob("checkpoints/step-*/COMPLETE")):
        assert proc.poll() is None, proc.communicate()[1]  # the job ended on its own: say why
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # mid-training, as likely as not mid-save (every 40 steps)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "gpupar: interrupted", err
    assert "Traceback" not in err and not any(_alive(r) for r in ranks)
    for step in (tmp_path / "int/checkpoints").iterdir():  # complete means whole: both ranks' files
        if (step / "COMPLETE").exists():
            assert {"trainer.json", ".metadata"} <= {p.name for p in step.iterdir()}
            assert sorted(p.name for p in (step / "rng").iterdir()) == ["rank-0.json", "rank-1.json"]

    proc, ranks = start("kill")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks), "a rank outlived its killed launcher by 5 s"


def _save_of_step(monkeypatch, step: int, at_call: int | None, sig: int, counted: list[int]) -> None:
    """Send ``sig`` to this process at the ``at_call``-th Python call inside the save of
    ``step`` (None: only count the calls into ``counted``). Python runs the handler at the
    next bytecode, wherever the save is then: in DCP's planner or writer, a JSON file, the seal."""
    from gpupar.checkpoint import Checkpointer

    real = Checkpointer.save

    def save(self, position, *args, **kwargs):
        if position.step != step:
            return real(self, position, *args, **kwargs)
        calls = [0]

        def profile(frame, event, arg):
            if event == "call":
                calls[0] += 1
                if calls[0] == at_call:
                    os.kill(os.getpid(), sig)

        sys.setprofile(profile)
        try:
            return real(self, position, *args, **kwargs)
        finally:
            sys.setprofile(None)
            counted.append(calls[0])

    monkeypatch.setattr(Checkpointer, "save", save)


def _whole_checkpoints(run: Path) -> list[int]:
    """The committed checkpoints, each held to its seal; no step-N/ is ever half there."""
    from gpupar.safe_dcp import check_seal

    found = []
    for step in sorted((run / "checkpoints").glob("step-*")):
        if step.name.endswith(".tmp"):
            continue  # never resumed (no step-N name) and removed by the next save
        check_seal(step, step.name)
        found.append(int(step.name.split("-")[1]))
    return found


def test_a_signal_anywhere_in_a_save_stops_cleanly_and_keeps_the_last_checkpoint(gpupar, tmp_path, monkeypatch):
    """SIGTERM and SIGINT at many points of the save of step 3 (a loop over the Python calls it
    makes): 143 / 130 and one line each time, never a traceback (DCP wraps the interrupt in its
    CheckpointException, a BaseException), every step-N left whole, and the run resumes."""
    args = (*FULL, "--epochs", 4, "--checkpoint-every", 1, "--keep-last", 2)
    counted: list[int] = []
    _save_of_step(monkeypatch, 3, None, signal.SIGTERM, counted)
    assert gpupar(*args, "--run-dir", tmp_path / "count")[0] == 0
    monkeypatch.undo()
    total = counted[0]  # a few thousand calls: DCP's plan, its writes, the JSON files, seal, prune
    points = sorted({1, 2, *range(3, total, max(1, total // 10)), total - 3, total - 1, total})
    for i, at in enumerate(points):
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
        run = tmp_path / f"r{at}"
        _save_of_step(monkeypatch, 3, at, sig, [])
        code, _, err = gpupar(*args, "--run-dir", run)
        monkeypatch.undo()
        assert (code, err) == (128 + sig, "gpupar: interrupted\n"), (at, total, err)
        assert _whole_checkpoints(run)[-2:] in ([1, 2], [2, 3]), (at, _whole_checkpoints(run))
    code, out, err = gpupar(*args, "--epochs", 5, "--resume", "auto", "--run-dir", run)  # the last one resumes
    assert code == 0 and "Resumed from" in out, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a tmpfs (root only)")
def test_a_disk_that_fills_mid_checkpoint_is_one_line_and_leaves_no_half_file(gpupar, tmp_path):
    """A 2 MiB tmpfs: the first checkpoint of a 1.6 MB model and Adam state fits, a later save fills the
    disk inside DCP's writer. One line naming ENOSPC, exit 1; the half-written step-N.tmp is
    gone, the earlier checkpoints are whole."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "R"
        code, _, err = gpupar(*FULL, "--model", "mlp", "--hidden", 256, "--layers", 4, "--epochs", 20,
                              "--checkpoint-every", 1, "--keep-last", 3, "--run-dir", run)
        assert code == 1, err
        one_line(err, "gpupar: training failed: the checkpoint of step ", "could not be written: No space left on device",
                 "the earlier checkpoints are kept")
        assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))
        assert _whole_checkpoints(run)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_file_size_limit_on_the_first_checkpoint_is_one_line_that_says_none_is_kept(gpupar, tmp_path):
    """``ulimit -f`` of 1 MiB (as a quota would): the first checkpoint's 1.1 MiB shard of weights
    fails with EFBIG inside DCP's writer. One line naming the limit, exit 1, and it does not
    claim earlier checkpoints that do not exist. Python ignores SIGXFSZ, so the write fails
    instead of killing this process; the limit is this process's for the length of the run."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    run = tmp_path / "R"
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        code, _, err = gpupar(*FULL, "--model", "mlp", "--hidden", 512, "--layers", 3, "--epochs", 3,
                              "--checkpoint-every", 1, "--run-dir", run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1, err
    one_line(err, "gpupar: training failed: the checkpoint of step 1 could not be written: File too large",
             "no checkpoint of this run was committed before it")
    assert not list(run.rglob("*.tmp")) and not _whole_checkpoints(run), list(run.rglob("*"))
