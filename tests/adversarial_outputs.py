"""Adversarial cases on where gpupar writes and what a run's files may hold: output paths
that are not a plain new file (a directory, a device, a link, another run's file) and hostile
contents of checkpoints, TOML and JSON beyond those of adversarial_files.py. All are fast: no
ranks, no signals."""

from __future__ import annotations

import json
import os
from pathlib import Path

from adversarial_kit import TRAIN, case, changed, judge, reseal, snapshot

# --- output paths that are not a plain new file ----------------------------------------------


def _predict_out(ctx, out: Path | str, expect=(2,)):
    run = ctx.base()
    before = snapshot(ctx.dir)
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv", "--out", out)
    return judge(r, expect=expect, lost=changed(before, ctx.dir, "the inputs"))


@case("lost")
def predict_out_is_a_directory(ctx):
    (ctx.dir / "outdir").mkdir()
    return _predict_out(ctx, ctx.dir / "outdir")


@case("lost")
def predict_out_is_a_symlink_to_the_weights(ctx):
    (ctx.dir / "p.csv").symlink_to(ctx.dir / "R/model.safetensors")
    return _predict_out(ctx, ctx.dir / "p.csv")


def _device_out(ctx, minor: int):
    """--out onto a character device made in the case's directory (1,7 is /dev/full, 1,3 is
    /dev/null): an atomic rename over it would replace the device node with a file, so the
    real /dev is never used."""
    import stat

    if os.geteuid() != 0:
        return "skipped", "needs root to make a device node"
    node = ctx.dir / "dev"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    run = ctx.base()
    before = snapshot(run)
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv", "--out", node)
    replaced = None if stat.S_ISCHR(os.lstat(node).st_mode) else "the device node was replaced by a file"
    return judge(r, lost=replaced or changed(before, run, "the run's files"))


@case("lost")
def predict_out_is_a_full_device(ctx):
    return _device_out(ctx, 7)


@case("lost")
def predict_out_is_a_null_device(ctx):
    return _device_out(ctx, 3)


@case("traceback")
def predict_out_in_a_missing_deep_folder(ctx):
    run = ctx.base()
    before = snapshot(run)
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "a/b/c/d/p.csv")
    return judge(r, expect=(0, 2), lost=changed(before, run, "the run's files"))


@case("lost")
def export_out_is_a_directory(ctx):
    run = ctx.base()
    (ctx.dir / "w.safetensors").mkdir()
    (ctx.dir / "w.safetensors/keep.txt").write_text("keep me\n")
    before = snapshot(ctx.dir)
    r = ctx.run("export", "--run", run, "--out", ctx.dir / "w.safetensors")
    return judge(r, lost=changed(before, ctx.dir, "the files"))


@case("lost")
def report_out_is_a_symlink_to_the_weights(ctx):
    run = ctx.base()
    (ctx.dir / "l.png").symlink_to(run / "model.safetensors")
    before = snapshot(run)
    r = ctx.run("report", run, "--out", ctx.dir / "l.png")
    return judge(r, expect=(0, 2), lost=changed(before, run, "the run's files"))


@case("lost")
def sweep_export_best_onto_another_run(ctx):
    other = ctx.base("O")
    before = snapshot(other)
    r = ctx.run("sweep", "--samples", 32, "--epochs", 1, "--lr", "0.01,0.1", "--run-dir", ctx.dir / "S",
                "--export-best", other / "model.safetensors")
    return judge(r, lost=changed(before, other, "the other run's files"))


@case("lost")
def train_run_dir_is_a_file(ctx):
    (ctx.dir / "R").write_text("keep me\n")
    r = ctx.run(*TRAIN, "--run-dir", ctx.dir / "R")
    return judge(r, lost=changed({"": b"keep me\n"}, ctx.dir / "R", "the file named as --run-dir"))


@case("lost")
def train_new_run_over_a_finished_run(ctx):
    run = ctx.base()
    before = snapshot(run)
    r = ctx.run(*TRAIN, "--lr", 0.1, "--run-dir", run)
    return judge(r, needles=["--overwrite"], lost=changed(before, run, "the finished run's files"))


@case("lost")
def checkpoint_step_is_a_symlink_out_of_the_run(ctx):
    """A planted checkpoints/step-1 link to a folder outside: rotation (--keep-last 2) must not
    delete through it, and resume must not read it."""
    run, elsewhere = ctx.base(), ctx.dir / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep me\n")
    (run / "checkpoints/step-1").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    r = ctx.run(*TRAIN, "--epochs", 14, "--checkpoint-every", 2, "--keep-last", 2, "--run-dir", run,
                "--resume", "auto")
    return judge(r, expect=(0, 2), lost=changed(before, elsewhere, "the folder step-1 points at"))


# --- hostile contents of a run's files, beyond adversarial_files.py ------------------------------


def _resume_with(ctx, name: str, content: str | None, expect=(2,)):
    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    if content is None:
        (ckpt / name).unlink()
    else:
        (ckpt / name).write_text(content)
    reseal(ckpt)
    r = ctx.run(*TRAIN, "--epochs", 12, "--resume", ckpt, "--run-dir", ctx.dir / "c")
    needles = [name.split("/")[-1].lstrip(".")] if r.code == 2 else []
    return judge(r, expect=expect, needles=needles, left=ctx.dir / "c")


def _trainer(ctx, **fields):
    base = json.loads((ctx.root / "base/checkpoints/step-10/trainer.json").read_text())
    return json.dumps({**base, **fields}, allow_nan=True)


@case("trust")
def trainer_json_nan_step(ctx):
    return _resume_with(ctx, "trainer.json", _trainer(ctx, position={"step": float("nan"), "epoch": 0, "batch": 0}))


@case("trust")
def trainer_json_huge_step(ctx):
    return _resume_with(ctx, "trainer.json", _trainer(ctx, position={"step": 10**40, "epoch": 10**40, "batch": 0}))


@case("trust")
def trainer_json_negative_position(ctx):
    return _resume_with(ctx, "trainer.json", _trainer(ctx, position={"step": -5, "epoch": -1, "batch": -3}))


@case("trust")
def trainer_json_is_a_list(ctx):
    return _resume_with(ctx, "trainer.json", "[1, 2, 3]")


@case("trust")
def trainer_json_very_long_string(ctx):
    return _resume_with(ctx, "trainer.json", _trainer(ctx, model="m" * 5_000_000, run_id="\u202e" * 1000),
                        expect=(0, 2))


@case("trust")
def checkpoint_without_metadata(ctx):
    return _resume_with(ctx, ".metadata", None)


@case("trust")
def checkpoint_metadata_empty(ctx):
    return _resume_with(ctx, ".metadata", "")


@case("trust")
def checkpoint_metadata_a_plain_dict(ctx):
    import pickle

    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    (ckpt / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}, "storage_data": {}}))
    reseal(ckpt)
    r = ctx.run("export", "--checkpoint", ckpt, "--out", ctx.dir / "w.safetensors")
    return judge(r, needles=[".metadata"])


@case("trust")
def checkpoint_metadata_length_beyond_the_shard(ctx):
    import dataclasses
    import pickle

    run = ctx.base()
    ckpt = run / "checkpoints/step-10"
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: trusted here
    for key, info in list(meta.storage_data.items()):
        meta.storage_data[key] = dataclasses.replace(info, offset=info.offset + 10**12, length=10**12)
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    reseal(ckpt)
    r = ctx.run("export", "--checkpoint", ckpt, "--out", ctx.dir / "w.safetensors")
    return judge(r)


@case("trust")
def checkpoint_without_rng(ctx):
    return _resume_with(ctx, "rng/rank-0.json", None)


@case("trust")
def resume_is_a_file(ctx):
    (ctx.dir / "ckpt").write_text("not a checkpoint\n")
    r = ctx.run(*TRAIN, "--resume", ctx.dir / "ckpt", "--run-dir", ctx.dir / "c")
    return judge(r, needles=["ckpt"], left=ctx.dir / "c")


@case("trust")
def summary_json_nan_and_unicode_runs(ctx):
    run = ctx.base()
    text = (run / "summary.json").read_text()
    summary = {**json.loads(text), "final_loss": float("nan"), "model": "\u202emodel\x1b[2J" + "x" * 100000}
    (run / "summary.json").write_text(json.dumps(summary, allow_nan=True))
    return judge(ctx.run("runs", ctx.dir), expect=(0, 2))


@case("trust")
def summary_json_is_a_string_runs(ctx):
    run = ctx.base()
    (run / "summary.json").write_text('"just a string"')
    return judge(ctx.run("runs", ctx.dir), expect=(0, 2))


@case("trust")
def metrics_jsonl_nan_infinity_report(ctx):
    run = ctx.base()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n'
                                       '{"step": 3, "loss": -Infinity}\n{"step": 1e400, "loss": 1}\n')
    return judge(ctx.run("report", run, "--out", ctx.dir / "l.png"), expect=(0, 2))


@case("trust")
def metrics_jsonl_empty_report(ctx):
    run = ctx.base()
    (run / "metrics.jsonl").write_text("")
    return judge(ctx.run("report", run, "--out", ctx.dir / "l.png"), expect=(0, 2))


@case("trust")
def config_toml_wrong_types_predict(ctx):
    run = ctx.base()
    config = run / "config.toml"
    config.write_text(config.read_text().replace("layers = 2", 'layers = "two"').replace("heads = 4", "heads = -4"))
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv")
    return judge(r, expect=(0, 2))


@case("trust")
def config_toml_hidden_too_wide_predict(ctx):
    run = ctx.base()
    config = run / "config.toml"
    config.write_text(config.read_text().replace("# hidden = (unset)", "hidden = 100000000000 #"))
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv")
    return judge(r)


@case("trust")
def config_toml_without_model_predict(ctx):
    run = ctx.base()
    (run / "config.toml").write_text("[train]\nepochs = 3\n")
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv")
    return judge(r, expect=(0, 2))


@case("trust")
def config_file_is_a_directory(ctx):
    (ctx.dir / "c.toml").mkdir()
    return judge(ctx.run("train", "--config", ctx.dir / "c.toml", "--print-config"), needles=["c.toml"])


@case("trust")
def config_file_is_binary(ctx):
    (ctx.dir / "c.toml").write_bytes(os.urandom(4096))
    return judge(ctx.run("train", "--config", ctx.dir / "c.toml", "--print-config"), needles=["c.toml"])


@case("trust")
def config_toml_wrong_types_train(ctx):
    path = ctx.dir / "c.toml"
    path.write_text('[train]\nepochs = "many"\n[optim]\nlr = [1, 2]\n[parallel]\nnproc_per_node = true\n')
    return judge(ctx.run("train", "--config", path, "--print-config"), needles=["c.toml"])


@case("trust")
def config_toml_unknown_section(ctx):
    path = ctx.dir / "c.toml"
    path.write_text('[trian]\nepochs = 3\n')
    return judge(ctx.run("train", "--config", path, "--print-config"), needles=["trian"])


@case("lost")
def sweep_export_best_beside_a_users_config(ctx):
    """--export-best writes its model's config.toml beside the weights: a user's own config.toml
    there must not be replaced."""
    mine = b"# my launch settings\n[train]\nepochs = 3\n"
    (ctx.dir / "config.toml").write_bytes(mine)
    r = ctx.run("sweep", "--samples", 32, "--epochs", 1, "--lr", "0.01,0.1", "--run-dir", ctx.dir / "S",
                "--export-best", ctx.dir / "best.safetensors")
    return judge(r, lost=changed({"": mine}, ctx.dir / "config.toml", "the user's config.toml"))


@case("hang")
def predict_out_is_a_fifo(ctx):
    run = ctx.base()
    os.mkfifo(ctx.dir / "p.csv")
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv", timeout=30)
    return judge(r, needles=["p.csv"])
