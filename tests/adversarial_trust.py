"""Adversarial cases on trust: files gpupar reads back (DCP metadata and shards, pickles,
weights, a run's config.toml, trainer.json and summary.json) that carry something they
should not, and a rendezvous that must stay on loopback."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from pathlib import Path

from adversarial_kit import HELD, SILENT, TRAIN, Evil, case, judge, point_shards, reseal

# --- trust: files gpupar reads back are untrusted ---------------------------------------------


def _export(ctx, ckpt: Path):
    out = ctx.dir / "w.safetensors"
    r = ctx.run("export", "--checkpoint", ckpt, "--out", out, timeout=60)
    return r, out


@case("trust")
def dcp_shard_path_absolute(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    outside = ctx.dir / "outside.distcp"
    outside.write_bytes((ckpt / "__0_0.distcp").read_bytes())
    point_shards(ckpt, str(outside))
    r, out = _export(ctx, ckpt)
    return judge(r, wrong="exported weights read from a file outside the checkpoint" if out.exists() else None)


@case("trust")
def dcp_shard_path_dotdot(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    (ctx.dir / "outside.distcp").write_bytes((ckpt / "__0_0.distcp").read_bytes())
    point_shards(ckpt, "../../../outside.distcp")
    r, out = _export(ctx, ckpt)
    return judge(r, wrong="exported weights read from a file outside the checkpoint" if out.exists() else None)


@case("trust", smoke=True)
def dcp_shard_is_a_fifo(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    os.mkfifo(ckpt / "pipe.distcp")
    point_shards(ckpt, "pipe.distcp")
    r, out = _export(ctx, ckpt)
    return judge(r, wrong="exported weights from a FIFO" if out.exists() else None)


@case("trust")
def dcp_shard_flipped_bytes_resume(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    r = ctx.run(*TRAIN, "--epochs", 12, "--resume", ckpt, "--run-dir", ctx.dir / "c")
    return judge(r, needles=["corrupt"], wrong="resumed from a corrupted shard" if r.code == 0 else None)


@case("trust")
def dcp_shard_flipped_bytes_export(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    r, out = _export(ctx, ckpt)
    return judge(r, needles=["corrupt"], wrong="exported a corrupted shard" if out.exists() else None)


def _no_code_run(ctx, r, marker: Path):
    return judge(r, wrong="the pickle's code ran" if marker.exists() else None)


@case("trust")
def malicious_pickle_pt_data(ctx):
    marker = ctx.dir / "pwned"
    (ctx.dir / "evil.pt").write_bytes(pickle.dumps({"X": Evil(marker)}))
    return _no_code_run(ctx, ctx.run(*TRAIN, "--data", ctx.dir / "evil.pt", "--run-dir", ctx.dir / "R"), marker)


@case("trust")
def malicious_pickle_npz_data(ctx):
    import numpy as np

    marker = ctx.dir / "pwned"
    with open(ctx.dir / "evil.npz", "wb") as fh:
        np.savez(fh, X=np.array([Evil(marker)], dtype=object), y=np.zeros(1))
    return _no_code_run(ctx, ctx.run(*TRAIN, "--data", ctx.dir / "evil.npz", "--run-dir", ctx.dir / "R"), marker)


@case("trust")
def malicious_pickle_dcp_metadata(ctx):
    run, marker = ctx.base(), ctx.dir / "pwned"
    ckpt = run / "checkpoints/step-10"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    reseal(ckpt)
    return _no_code_run(ctx, ctx.run(*TRAIN, "--epochs", 12, "--resume", ckpt, "--run-dir", ctx.dir / "c"), marker)


@case("trust")
def malicious_pickle_weights(ctx):
    marker = ctx.dir / "pwned"
    (ctx.dir / "w.pt").write_bytes(pickle.dumps({"fc.weight": Evil(marker)}))
    r = ctx.run("predict", "--weights", ctx.dir / "w.pt", "--data", ctx.root / "x.csv", "--out", ctx.dir / "p.csv")
    return _no_code_run(ctx, r, marker)


@case("trust", smoke=True)
def predict_calls_the_factory_a_config_names(ctx):
    run = ctx.base()
    config = run / "config.toml"
    config.write_text(config.read_text().replace('name = "simple-nn"', 'name = "adv_models:writes_marker"'))
    marker = ctx.root / "factory-called"
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv")
    called = marker.exists()
    marker.unlink(missing_ok=True)
    return judge(r, needles=["--model"], wrong="predict called a factory that a run's config.toml names"
                 if called else None)


def _hostile_resume(ctx, name: str, content: str):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    (ckpt / name).write_text(content)
    reseal(ckpt)
    r = ctx.run(*TRAIN, "--epochs", 12, "--resume", ckpt, "--run-dir", ctx.dir / "c")
    return judge(r, needles=[name.split("/")[-1]] if r.code == 2 else [])


DEEP = "[" * 100000 + "]" * 100000


@case("trust", smoke=True)
def trainer_json_deeply_nested(ctx):
    return _hostile_resume(ctx, "trainer.json", DEEP)


@case("trust")
def trainer_json_shadowing_fields(ctx):
    return _hostile_resume(ctx, "trainer.json", json.dumps({"position": {"step": 1, "epoch": 0, "batch": 0},
                                                           "get": 1, "items": [], "__class__": "x",
                                                           "scheduler": [1], "steps_per_epoch": "1"}))


@case("trust")
def rng_json_hostile(ctx):
    return _hostile_resume(ctx, "rng/rank-0.json", json.dumps({"torch": "!!", "python": [3, [1] * 5, None],
                                                              "numpy": ["MT19937", [1], 0, 0, 0.0]}))


@case("trust")
def complete_marker_hostile(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    (ckpt / "COMPLETE").write_text(DEEP)
    r = ctx.run(*TRAIN, "--epochs", 12, "--resume", ckpt, "--run-dir", ctx.dir / "c")
    return judge(r, expect=(0, 2))  # an old-style marker is not proof of harm: one line or success


def _hostile_summary(ctx, content: str, command: str):
    run = ctx.base()
    (run / "summary.json").write_text(content)
    r = ctx.run("runs", ctx.dir) if command == "runs" else ctx.run("report", run, "--out", ctx.dir / "l.png")
    return judge(r, expect=(0, 2))


@case("trust")
def summary_json_deeply_nested_runs(ctx):
    return _hostile_summary(ctx, DEEP, "runs")


@case("trust")
def summary_json_shadowing_fields_runs(ctx):
    return _hostile_summary(ctx, json.dumps({"model": {"keys": 1}, "final_loss": "x", "wall_time_s": [1],
                                             "world_size": "two", "strategy": None, "finished": 3,
                                             "__class__": 1}), "runs")


@case("trust")
def metrics_jsonl_hostile_report(ctx):
    run = ctx.base()
    (run / "metrics.jsonl").write_text(DEEP + "\n" + json.dumps({"step": "x", "loss": [1]}) + "\n{\n")
    r = ctx.run("report", run, "--out", ctx.dir / "l.png")
    return judge(r, expect=(0, 2))


@case("trust")
def config_toml_hostile_predict(ctx):
    run = ctx.base()
    (run / "config.toml").write_text("[model]\nname = 1\nlayers = \"x\"\n[[train]]\n" + "a = [" * 1000 + "\n")
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv")
    return judge(r, expect=(0, 2))


@case("trust")
def launch_toml_hostile(ctx):
    path = ctx.dir / "launch.toml"
    path.write_text("[parallel]\ntimeout = nan\nnproc_per_node = -1\n[x]\n" + "b = {" * 500 + "\n")
    return judge(ctx.run("train", "--config", path, "--print-config"))


@case("trust", fast=False)
def rdzv_remote_master_addr_env(ctx):
    """MASTER_ADDR naming another machine in the environment: a one-node job stays on loopback."""
    r = ctx.run(*TRAIN, "--epochs", 2, "--strategy", "ddp", "--nproc-per-node", 2, "--run-dir", ctx.dir / "R",
                env={"MASTER_ADDR": "10.255.255.1", "MASTER_PORT": "29999"}, timeout=180)
    return judge(r, expect=(0,))


@case("trust")
def rdzv_endpoint_not_loopback(ctx):
    r = ctx.run(*TRAIN, "--strategy", "ddp", "--nproc-per-node", 2, "--rdzv-endpoint", "0.0.0.0:29555",
                "--run-dir", ctx.dir / "R")
    return judge(r, needles=["loopback"])


def _listening(pids: list[int]) -> list[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                found.append(f[1].split(":")[0])
    return found


@case("trust", fast=False)
def rdzv_ipv6_loopback_listens_on_loopback_only(ctx):
    from harness import free_port

    if not Path("/proc/net/tcp6").exists():
        return "skipped", "no IPv6 /proc table"
    proc = ctx.popen("train", "--strategy", "ddp", "--nproc-per-node", 2, "--samples", 64, "--epochs", 10**8,
                     "--log-every", 10**8, "--rdzv-endpoint", f"[::1]:{free_port()}", "--run-dir", ctx.dir / "R",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.readline()
        time.sleep(1)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        addrs = _listening([proc.pid, *map(int, kids)])
    finally:
        proc.send_signal(2)
        proc.communicate(timeout=60)
    loopback = {"0100007F", "00000000000000000000000001000000"}
    wide = [a for a in addrs if a not in loopback]
    if addrs and not wide:
        return HELD, f"{len(addrs)} listeners, all loopback"
    return SILENT, f"listens on {wide or 'nothing seen'}"


