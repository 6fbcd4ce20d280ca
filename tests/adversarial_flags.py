"""Adversarial cases on flag values: NaN, infinities, zero, negative and out-of-range numbers
for the numeric flags of train, verify, sweep, predict and plan. Each must be one line naming
the flag, exit 2, before any work, and leave no run directory behind. All are fast: the
checks run before any rank would start."""

from __future__ import annotations

import socket

from adversarial_kit import HELD, TRAIN, UNCLEAR, case, judge, lines

SHORT = ("--samples", 32, "--epochs", 1)
VERIFY = ("verify", *SHORT, "--strategy", "ddp", "--nproc-per-node", 2)  # verify compares a layout

# (command and its fixed arguments, the flag, its bad value, the case's name)
BAD_VALUES = [
    (TRAIN, "--lr", "nan", "train_lr_nan"),
    (TRAIN, "--lr", "-inf", "train_lr_minus_inf"),
    (TRAIN, "--epochs", "-1", "train_epochs_negative"),
    (TRAIN, "--batch-size", "0", "train_batch_size_zero"),
    (TRAIN, "--grad-accum", "0", "train_grad_accum_zero"),
    (TRAIN, "--samples", "0", "train_samples_zero"),
    (TRAIN, "--features", "0", "train_features_zero"),
    (TRAIN, "--val-fraction", "nan", "train_val_fraction_nan"),
    (TRAIN, "--val-fraction", "1", "train_val_fraction_one"),
    (TRAIN, "--noise", "inf", "train_noise_inf"),
    (TRAIN, "--clip-grad-norm", "nan", "train_clip_grad_norm_nan"),
    (TRAIN, "--weight-decay", "nan", "train_weight_decay_nan"),
    (TRAIN, "--warmup-steps", "-1", "train_warmup_steps_negative"),
    (TRAIN, "--log-every", "0", "train_log_every_zero"),
    (TRAIN, "--checkpoint-every", "0", "train_checkpoint_every_zero"),
    (TRAIN, "--keep-last", "1", "train_keep_last_one"),
    (TRAIN, "--max-steps", "0", "train_max_steps_zero"),
    (TRAIN, "--seed", str(2**70), "train_seed_beyond_64_bits"),
    (TRAIN, "--hidden", "0", "train_hidden_zero"),
    (TRAIN + ("--model", "mlp"), "--layers", "0", "train_mlp_layers_zero"),
    (TRAIN + ("--model", "gpt"), "--heads", "0", "train_gpt_heads_zero"),
    (TRAIN, "--nproc-per-node", "0", "train_nproc_per_node_zero"),
    (TRAIN, "--timeout", "-5", "train_timeout_negative"),
    (VERIFY, "--rtol", "nan", "verify_rtol_nan"),
    (VERIFY, "--rtol", "-1", "verify_rtol_negative"),
    (VERIFY, "--band", "nan", "verify_band_nan"),
    (("sweep", *SHORT), "--lr", "0.01,nan", "sweep_lr_nan"),
    (("sweep", *SHORT), "--hidden", "0,8", "sweep_hidden_zero"),
    (("sweep", *SHORT), "--max-fused", "0", "sweep_max_fused_zero"),
    (("sweep", *SHORT), "--seeds", "5-1", "sweep_seeds_reversed_range"),
    (("plan",), "--world-sizes", "0", "plan_world_sizes_zero"),
    (("plan",), "--world-sizes", "nan", "plan_world_sizes_nan"),
    (("plan",), "--device-memory", "-5GB", "plan_device_memory_negative"),
]

for _args, _flag, _value, _name in BAD_VALUES:
    def _case(ctx, args=_args, flag=_flag, value=_value):
        run = ctx.dir / "R"
        return judge(ctx.run(*args, flag, value, "--run-dir", run), needles=[flag], left=run)

    _case.__name__ = _name
    case("traceback")(_case)


@case("traceback")
def predict_batch_size_zero(ctx):
    run = ctx.base()
    r = ctx.run("predict", "--weights", run / "model.safetensors", "--data", ctx.root / "x.csv",
                "--out", ctx.dir / "p.csv", "--batch-size", 0)
    return judge(r, needles=["--batch-size"])


# --- tracking stores: one line before launch, or a bounded wait and one warning -------------

@case("traceback")
def mlflow_uri_scheme_s3(ctx):  # an artifact store, not a tracking store
    return judge(ctx.run(*TRAIN, "--track", "mlflow", "--mlflow-uri", "s3://bucket/x", "--run-dir", ctx.dir / "R"),
                 needles=["s3://"], left=ctx.dir / "R")


@case("traceback")
def mlflow_tracking_uri_env_bogus(ctx):
    r = ctx.run(*TRAIN, "--track", "mlflow", "--run-dir", ctx.dir / "R", env={"MLFLOW_TRACKING_URI": "ftp://x"})
    return judge(r, needles=["MLFLOW_TRACKING_URI", "ftp://"], left=ctx.dir / "R")


def _tracked(ctx, uri: str, timeout: int = 5):
    """Training goes on: exit 0, the model saved, one warning line, within the bound."""
    run = ctx.dir / "R"
    r = ctx.run(*TRAIN, "--track", "mlflow", "--mlflow-uri", uri, "--track-timeout", timeout, "--run-dir", run,
                timeout=90)
    outcome = judge(r, expect=(0,))
    if outcome[0] != HELD:
        return outcome
    if not (run / "model.safetensors").is_file():
        return UNCLEAR, "exit 0 but no model.safetensors"
    err = lines(r.err)
    if len(err) != 1 or not err[0].startswith("gpupar: warning:"):
        return UNCLEAR, f"{len(err)} lines on stderr, expected one warning"
    return outcome


@case("hang")
def mlflow_server_accepts_and_never_answers(ctx):
    silent = socket.socket()  # the kernel completes the TCP handshake; nothing ever replies
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        return _tracked(ctx, f"http://127.0.0.1:{silent.getsockname()[1]}")
    finally:
        silent.close()


@case("hang")
def mlflow_server_refuses_and_the_run_saves(ctx):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return _tracked(ctx, f"http://127.0.0.1:{port}")
