"""Adversarial cases on files: a run directory that is not only its run's (data lost). Files
gpupar reads back that carry something they should not: adversarial_trust.py."""

from __future__ import annotations

import json
import os
import subprocess

from adversarial_kit import TRAIN, case, changed, csv, judge, reseal, snapshot

# --- data lost: a run directory holds only what its run wrote ---------------------------------


@case("lost")
def resume_other_run_over_a_run(ctx):
    x, y = ctx.base("X"), ctx.base("Y")
    (y / "summary.json").write_text(json.dumps({**json.loads((y / "summary.json").read_text()), "run_id": "other0"}))
    for p in (y / "checkpoints").glob("*/trainer.json"):  # Y is another run: another run id
        p.write_text(json.dumps({**json.loads(p.read_text()), "run_id": "other0"}))
        reseal(p.parent)
    (x / "model.safetensors").write_bytes((x / "model.safetensors").read_bytes())
    before = snapshot(x)
    r = ctx.run(*TRAIN, "--epochs", 12, "--run-dir", x, "--resume", y / "checkpoints/step-10")
    return judge(r, needles=["--overwrite"], lost=changed(before, x, "X's files"))


@case("lost", smoke=True)
def lock_is_a_symlink_out_of_the_run(ctx):
    outside = ctx.dir / "outside.txt"
    outside.write_text("keep me\n")
    run = ctx.dir / "R"
    run.mkdir()
    (run / ".gpupar.lock").symlink_to(outside)
    r = ctx.run(*TRAIN, "--run-dir", run)
    return judge(r, needles=["symlink"], lost=changed({"": b"keep me\n"}, outside, "the file the lock points at"))


def _linked_run_file(ctx, name: str, extra=()):
    """A run whose ``name`` is a symlink to a file outside it; a resumed run writes ``name``."""
    run = ctx.base()
    outside = ctx.dir / "outside.txt"
    outside.write_text("keep me\n")
    (run / name).unlink()
    (run / name).symlink_to(outside)
    r = ctx.run(*TRAIN, "--epochs", 12, "--run-dir", run, "--resume", "auto", *extra)
    return judge(r, expect=(0, 2), lost=changed({"": b"keep me\n"}, outside, f"the file {name} points at"))


@case("lost")
def metrics_jsonl_is_a_symlink(ctx):
    return _linked_run_file(ctx, "metrics.jsonl")


@case("lost")
def summary_json_is_a_symlink(ctx):
    return _linked_run_file(ctx, "summary.json")


@case("lost")
def config_toml_is_a_symlink(ctx):
    return _linked_run_file(ctx, "config.toml")


@case("lost")
def checkpoints_folder_is_a_symlink(ctx):
    run, elsewhere = ctx.dir / "R", ctx.dir / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    r = ctx.run(*TRAIN, "--checkpoint-every", 5, "--run-dir", run)
    return judge(r, needles=["symlink"], lost=f"wrote {os.listdir(elsewhere)} outside" if os.listdir(elsewhere) else None)


@case("lost")
def checkpoint_tmp_is_a_symlink(ctx):
    """A planted step-N.tmp link: the save must not write through it."""
    run, elsewhere = ctx.base(), ctx.dir / "elsewhere"
    elsewhere.mkdir()
    (run / "checkpoints/step-12.tmp").symlink_to(elsewhere)
    r = ctx.run(*TRAIN, "--epochs", 12, "--checkpoint-every", 2, "--run-dir", run, "--resume", "auto")
    return judge(r, expect=(0, 2), lost=f"wrote {os.listdir(elsewhere)} outside" if os.listdir(elsewhere) else None)


@case("lost")
def tensorboard_dir_is_a_symlink(ctx):
    run, elsewhere = ctx.dir / "R", ctx.dir / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "tensorboard").symlink_to(elsewhere)
    r = ctx.run(*TRAIN, "--track", "tensorboard", "--run-dir", run)
    return judge(r, needles=["symlink"], lost=f"wrote {os.listdir(elsewhere)} outside" if os.listdir(elsewhere) else None)


@case("lost")
def report_out_is_a_symlink(ctx):
    run, outside = ctx.base(), ctx.dir / "outside.txt"
    outside.write_text("keep me\n")
    (run / "loss.png").symlink_to(outside)
    r = ctx.run("report", run)
    return judge(r, expect=(0, 2), lost=changed({"": b"keep me\n"}, outside, "the file loss.png points at"))


def _predict_onto(ctx, which: str):
    run = ctx.base()
    data = csv(ctx.dir / "d.csv")
    target = {"csv": data, "weights": run / "model.safetensors", "config": run / "config.toml"}.get(which)
    if which == "hardlink":
        os.link(data, ctx.dir / "hard.csv")
        target = ctx.dir / "hard.csv"
    before = snapshot(ctx.dir)
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", data, "--out", target)
    return judge(r, lost=changed(before, ctx.dir, "the inputs"))


@case("lost", smoke=True)
def predict_out_is_the_input_csv(ctx):
    return _predict_onto(ctx, "csv")


@case("lost")
def predict_out_is_the_weights(ctx):
    return _predict_onto(ctx, "weights")


@case("lost")
def predict_out_is_a_hard_link_of_the_input(ctx):
    return _predict_onto(ctx, "hardlink")


@case("lost")
def predict_out_is_the_runs_config(ctx):
    return _predict_onto(ctx, "config")


@case("lost")
def export_out_is_the_runs_weights(ctx):
    run = ctx.base()
    before = snapshot(run)
    r = ctx.run("export", "--checkpoint", run / "checkpoints/step-5", "--out", run / "model.safetensors")
    return judge(r, lost=changed(before, run, "the run's files"))


@case("lost")
def export_out_into_another_run(ctx):
    run, other = ctx.base(), ctx.base("O")
    before = snapshot(other)
    r = ctx.run("export", "--run", run, "--out", other / "model.safetensors")
    return judge(r, lost=changed(before, other, "the other run's files"))


def _closed(ctx, stream: str):
    run = ctx.dir / "R"
    proc = ctx.popen(*TRAIN, "--epochs", 300, "--log-every", 1, "--run-dir", run,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stream == "stdout":
        proc.stdout.readline()  # as `| head -1` does
        proc.stdout.close()
        err = proc.stderr.read()
    else:
        proc.stderr.close()
        err = ""
        proc.stdout.read()
    try:
        code = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    from adversarial_kit import Result

    r = Result(code, "", err or "", hung=code is None, seconds=0)
    ctx.last = r
    saved = (run / "summary.json").is_file() and (run / "model.safetensors").is_file()
    return judge(r, expect=(0,), lost=None if saved or code is None else "the run's results were not saved")


@case("lost", fast=False)
def closed_stdout(ctx):
    return _closed(ctx, "stdout")


@case("lost", fast=False)
def closed_stderr(ctx):
    return _closed(ctx, "stderr")
