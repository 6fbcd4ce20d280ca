"""Adversarial cases on faults and inputs: stuck and killed ranks, values that end in a
traceback, inputs that would train the wrong thing, and checks that come late (after ranks
started, or leaving files behind). Signals and full disks mid-save: adversarial_saves.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from adversarial_kit import (HANG, HELD, RANKS, SKIPPED, TRAIN, UNCLEAR, Result, case, csv, judge, lines, reads_back,
                             snapshot)

# --- values that ended in a traceback -------------------------------------------------------


@case("traceback")
def timeout_nan_with_ranks(ctx):
    return judge(ctx.run(*TRAIN, *RANKS, "--timeout", "nan", "--run-dir", ctx.dir / "R"), needles=["--timeout"],
                 left=ctx.dir / "R")


@case("traceback")
def timeout_inf_with_ranks(ctx):
    return judge(ctx.run(*TRAIN, *RANKS, "--timeout", "inf", "--run-dir", ctx.dir / "R"), needles=["--timeout"],
                 left=ctx.dir / "R")


@case("traceback")
def timeout_zero_with_ranks(ctx):
    return judge(ctx.run(*TRAIN, *RANKS, "--timeout", "0", "--run-dir", ctx.dir / "R"), needles=["--timeout"],
                 left=ctx.dir / "R")


@case("traceback")
def hidden_too_wide_to_allocate(ctx):
    return judge(ctx.run(*TRAIN, "--hidden", 100000000000, "--run-dir", ctx.dir / "R"), left=ctx.dir / "R")


@case("traceback")
def model_without_trainable_parameters(ctx):
    return judge(ctx.run(*TRAIN, "--model", "adv_models:no_params", "--run-dir", ctx.dir / "R"), left=ctx.dir / "R")


@case("traceback")
def model_with_integer_output(ctx):
    return judge(ctx.run(*TRAIN, "--model", "adv_models:int_output", "--run-dir", ctx.dir / "R"), left=ctx.dir / "R")


@case("traceback")
def report_out_unsupported_format(ctx):
    return judge(ctx.run("report", ctx.base(), "--out", ctx.dir / "loss.gif"), needles=[".gif"])


def _readonly_dir(ctx) -> Path | None:
    ro = ctx.dir / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount is the test
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
        return ro if ok.returncode == 0 else None
    ro.chmod(0o555)
    return ro


def _into_readonly(ctx, command):
    ro = _readonly_dir(ctx)
    if ro is None:
        return SKIPPED, "cannot make a read-only directory"
    try:
        return judge(ctx.run(*command(ro)))
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True) if os.geteuid() == 0 else ro.chmod(0o755)


@case("traceback")
def predict_out_in_readonly_dir(ctx):
    run = ctx.base()
    return _into_readonly(ctx, lambda ro: ("predict", "--weights", run / "model.safetensors", "--data",
                                           ctx.root / "x.csv", "--out", ro / "p.csv"))


@case("traceback")
def export_out_in_readonly_dir(ctx):
    run = ctx.base()
    return _into_readonly(ctx, lambda ro: ("export", "--run", run, "--out", ro / "w.safetensors"))


@case("traceback")
def report_out_in_readonly_dir(ctx):
    run = ctx.base()
    return _into_readonly(ctx, lambda ro: ("report", run, "--out", ro / "l.png"))


@case("traceback")
def train_run_dir_in_readonly_dir(ctx):
    return _into_readonly(ctx, lambda ro: (*TRAIN, "--run-dir", ro / "R"))


@case("traceback")
def mlflow_bogus_uri(ctx):
    r = ctx.run(*TRAIN, "--track", "mlflow", "--mlflow-uri", "bogus://x", "--run-dir", ctx.dir / "R", timeout=90)
    return judge(r, expect=(0, 2))


# --- hangs: bounded waits, and a stuck rank named with its collective -----------------------


@case("hang")
def mlflow_server_refuses_connections(ctx):
    r = ctx.run(*TRAIN, "--track", "mlflow", "--mlflow-uri", "http://127.0.0.1:9", "--run-dir", ctx.dir / "R",
                timeout=90)
    return judge(r, expect=(0, 2))


@case("hang", fast=False)
def rank_stalls_before_a_collective(ctx):
    """Rank 1 sleeps in its 4th forward pass; rank 0 waits in the gradient all-reduce. The job
    must end after --timeout naming rank 1 and the collective."""
    r = ctx.run(*TRAIN, *RANKS, "--model", "adv_models:stall_rank1", "--timeout", 5, "--run-dir", ctx.dir / "R",
                timeout=120)
    last = lines(r.err)[-1] if lines(r.err) else ""
    outcome = judge(r, expect=(1,), max_lines=None)
    if outcome[0] != HELD:
        return outcome
    if "rank 1" not in last or "all_reduce" not in last.replace("allreduce", "all_reduce"):
        return UNCLEAR, f"the last line does not name rank 1 and its collective: {last[:200]!r}"
    return HELD, last[:160]


@case("hang", fast=False)
def rank_stopped_by_sigstop(ctx):
    run = ctx.dir / "R"
    proc = ctx.popen(*TRAIN, *RANKS, "--epochs", 10**6, "--log-every", 10**6, "--timeout", 5, "--run-dir", run,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(kids[-1]), signal.SIGSTOP)
    try:
        out, err = proc.communicate(timeout=120)
        r = Result(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        r = Result(None, *proc.communicate(), hung=True, seconds=120)
    ctx.last = r
    return judge(r, expect=(1,), needles=["rank 1"], max_lines=None)


@case("hang", fast=False)
def rank_killed_with_sigkill(ctx):
    r = ctx.run(*TRAIN, *RANKS, "--model", "adv_models:kill9_rank1", "--run-dir", ctx.dir / "R", timeout=120)
    return judge(r, expect=(1,), needles=["rank 1", "SIGKILL"], max_lines=None)


@case("hang", fast=False)
def launcher_killed_with_sigkill(ctx):
    proc = ctx.popen(*TRAIN, *RANKS, "--epochs", 10**6, "--log-every", 10**6, "--run-dir", ctx.dir / "R",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    kids = [int(k) for k in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 10
    alive = kids
    while alive and time.monotonic() < deadline:
        alive = [k for k in kids if Path(f"/proc/{k}").exists()
                 and Path(f"/proc/{k}/stat").read_text().split(")")[1].split()[0] != "Z"]
        time.sleep(0.1)
    for k in alive:
        os.kill(k, signal.SIGKILL)
    return (HANG, f"ranks {alive} outlived their launcher by 10 s") if alive else (HELD, "ranks died with it")


# --- silent wrong results ---------------------------------------------------------------------


@case("silent", fast=False)
def fsdp_factory_that_inits_per_rank(ctx):
    """FSDP at world 2 must start from rank 0's values (as DDP does) or refuse: compared with
    one process that draws rank 0's values and accumulates two micro-batches."""
    model = ("--model", "adv_models:per_rank_init", "--samples", 64, "--epochs", 3, "--log-every", 100)
    r = ctx.run("train", *model, "--strategy", "fsdp", "--nproc-per-node", 2, "--run-dir", ctx.dir / "F", timeout=240)
    if r.code != 0:
        return judge(r, max_lines=None)
    single = ctx.run("train", *model, "--grad-accum", 2, "--run-dir", ctx.dir / "S")
    if single.code != 0:
        return "error", "the single-device reference failed"
    from safetensors.torch import load_file

    a, b = load_file(ctx.dir / "F/model.safetensors"), load_file(ctx.dir / "S/model.safetensors")
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Summation order alone moves these weights by < 1e-5 after 3 steps (NOTES.md, rounding).
    return judge(r, expect=(0,), wrong=f"weights differ from rank 0's init by {gap:.3g}" if gap > 1e-4 else None)


def _csv_target(ctx, header: str):
    data = csv(ctx.dir / "d.csv", header=header)
    return judge(ctx.run(*TRAIN, "--data", data, "--target", "y", "--run-dir", ctx.dir / "R"), needles=["y"],
                 left=ctx.dir / "R")


@case("silent")
def csv_duplicate_target_column(ctx):
    return _csv_target(ctx, "a,y,y")


@case("silent")
def csv_duplicate_feature_column(ctx):
    return _csv_target(ctx, "a,a,y")


def _sweep(ctx, *axis):
    r = ctx.run("sweep", "--samples", 32, "--epochs", 1, *axis, "--run-dir", ctx.dir / "S")
    return judge(r, needles=[axis[0]], left=ctx.dir / "S")


@case("silent")
def sweep_duplicate_lr(ctx):
    return _sweep(ctx, "--lr", "0.01,0.01")


@case("silent")
def sweep_duplicate_lr_spelled_differently(ctx):
    return _sweep(ctx, "--lr", "0.01,1e-2")


@case("silent")
def sweep_duplicate_hidden(ctx):
    return _sweep(ctx, "--hidden", "8,8")


@case("silent")
def sweep_duplicate_seeds(ctx):
    return _sweep(ctx, "--seeds", "1,1")


# --- wrong exit codes and late checks ---------------------------------------------------------


@case("late")
def ddp_bucket_mb_nan(ctx):
    r = ctx.run(*TRAIN, *RANKS, "--ddp-bucket-mb", "nan", "--run-dir", ctx.dir / "R")
    late = "the ranks started first" if "Using device" in r.out else None
    return judge(r, needles=["--ddp-bucket-mb"], wrong=late, left=ctx.dir / "R")


@case("late")
def ddp_bucket_mb_negative(ctx):
    r = ctx.run(*TRAIN, *RANKS, "--ddp-bucket-mb", "-1", "--run-dir", ctx.dir / "R")
    return judge(r, needles=["--ddp-bucket-mb"], left=ctx.dir / "R")


@case("late")
def model_is_sys_exit(ctx):
    return judge(ctx.run(*TRAIN, "--model", "sys:exit", "--run-dir", ctx.dir / "R"), needles=["sys:exit"],
                 left=ctx.dir / "R")


@case("late")
def model_factory_missing(ctx):
    return judge(ctx.run(*TRAIN, "--model", "adv_models:nonexistent", "--run-dir", ctx.dir / "R"),
                 needles=["nonexistent"], left=ctx.dir / "R")


def _truncated(ctx, *ranks):
    run = ctx.base()
    weights = ctx.dir / "w.safetensors"
    weights.write_bytes((run / "model.safetensors").read_bytes()[:-100])
    return judge(ctx.run("predict", "--weights", weights, "--data", ctx.root / "x.csv", "--out", ctx.dir / "p.csv",
                         *ranks), needles=["w.safetensors"])


@case("late")
def predict_truncated_weights(ctx):
    return _truncated(ctx)


@case("late")
def predict_truncated_weights_with_ranks(ctx):
    return _truncated(ctx, "--nproc-per-node", 2)


@case("late")
def npz_integer_features(ctx):
    import numpy as np

    with open(ctx.dir / "d.npz", "wb") as fh:
        np.savez(fh, X=np.arange(640).reshape(64, 10), y=np.arange(64, dtype=np.float32))
    r = ctx.run(*TRAIN, "--data", ctx.dir / "d.npz", "--run-dir", ctx.dir / "R")
    return judge(r, expect=(0, 2), needles=[] if r.code == 0 else ["int"], left=ctx.dir / "R")


@case("late")
def run_dir_with_a_newline(ctx):
    run = ctx.dir / "R\nx"
    return reads_back(ctx, ctx.run(*TRAIN, "--run-dir", run), run)


@case("late")
def csv_column_with_a_newline(ctx):
    data = ctx.dir / "d.csv"
    csv(data, header=",".join(f"f{i}" for i in range(9)) + ",y")
    text = data.read_text().splitlines()
    text[0] = '"f\n0",' + text[0].split(",", 1)[1]
    data.write_text("\n".join(text) + "\n")
    run = ctx.dir / "R"
    return reads_back(ctx, ctx.run(*TRAIN, "--data", data, "--target", "y", "--run-dir", run), run)


@case("late")
def batch_larger_than_the_data_leaves_nothing(ctx):
    return judge(ctx.run(*TRAIN, "--batch-size", 5000, "--run-dir", ctx.dir / "R"), left=ctx.dir / "R")


@case("late")
def missing_data_file_leaves_nothing(ctx):
    return judge(ctx.run(*TRAIN, "--data", ctx.dir / "nope.csv", "--run-dir", ctx.dir / "R"), left=ctx.dir / "R")


@case("late")
def corrupt_resume_leaves_nothing(ctx):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    (ckpt / "trainer.json").write_text("{")
    r = ctx.run(*TRAIN, "--epochs", 12, "--resume", ckpt, "--run-dir", ctx.dir / "new")
    return judge(r, left=ctx.dir / "new")


@case("late")
def resume_of_a_missing_checkpoint_leaves_nothing(ctx):
    r = ctx.run(*TRAIN, "--resume", ctx.dir / "nope", "--run-dir", ctx.dir / "new")
    return judge(r, left=ctx.dir / "new")


@case("late")
def shape_mismatch_resume_leaves_nothing(ctx):
    run = ctx.base()
    r = ctx.run(*TRAIN, "--hidden", 60, "--resume", run / "checkpoints/step-10", "--run-dir", ctx.dir / "new")
    return judge(r, needles=["shape"], left=ctx.dir / "new")


@case("late")
def resume_of_a_run_with_other_data_shape(ctx):
    """The same run resumed with other batches per epoch: one line, its files unchanged."""
    run = ctx.base()
    before = snapshot(run)
    r = ctx.run(*TRAIN, "--batch-size", 16, "--epochs", 12, "--resume", "auto", "--run-dir", run)
    now = snapshot(run)
    gone = [k for k in before if k not in now or now[k] != before[k]]
    return judge(r, lost=f"changed {gone[:3]}" if gone else None)



