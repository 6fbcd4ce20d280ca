"""`gpupar verify -- python script.py [args]`: parity for the user's own loop.

The script runs as written, three times: once on one process (the reference; the loader's
batch_size is the global batch, so the same batches), once in ranks with the requested
strategy, through `gpupar run`, and once more on one process with its initial weights one ulp
off (the rounding-noise reference; left out when the step-1 loss already fails, which no
noise can excuse). In each, ``gpupar.setup`` records what the verdict
needs (``record.py``: every step's loss, the step-1 gradients, the final state), and the
verdict is `gpupar verify`'s own: strict at step 1, then calibrated against the rounding
noise, naming the first diverging step and parameter.

The summation-order reference of `gpupar verify` (another micro-batch split) needs a loop
gpupar owns; here the noise floor is the nudge's, and the fixed floor below it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpupar.config import Config
from gpupar.errors import TrainingError, UsageError
from gpupar.launch.elastic import launched_by_torchrun
from gpupar.ownloop import STRATEGY_ENV
from gpupar.ownloop.record import DIR_ENV, NO_DROPOUT_ENV, NUDGE_ENV

# The flags that mean something to a script run: the layout gpupar.setup reads, and verify's own run dir.
SCRIPT_FLAGS = ("parallel.strategy", "parallel.nproc_per_node", "parallel.timeout", "train.run_dir",
                "train.overwrite")
RECORDS = ("step_losses.json", "model.safetensors", "first_grads.safetensors", "notes.json")


def script_of(command: list[str]) -> tuple[str, list[str]]:
    """(script, its arguments) of ``python script.py args`` (or ``script.py args``)."""
    words = command[1:] if command and Path(command[0]).name.startswith("python") else command
    if not words or words[0].startswith("-") or not words[0].endswith(".py"):
        raise UsageError(f"gpupar verify -- {' '.join(command)}: expected `python SCRIPT.py [args]` after --")
    if not Path(words[0]).is_file():
        raise UsageError(f"gpupar verify -- python {words[0]}: no such script")
    return words[0], words[1:]


def check_flags(cfg: Config, given: list[str]) -> None:
    """A script owns its model, data and training: only the layout's flags apply to it."""
    other = sorted(f"--{d.split('.', 1)[1].replace('_', '-')}" for d in given if d not in SCRIPT_FLAGS)
    if other:
        raise UsageError(f"gpupar verify -- python SCRIPT.py takes --strategy, --nproc-per-node, --timeout and "
                         f"--run-dir; {', '.join(other)} belong to the script (its own arguments, or gpupar.setup's)")
    if launched_by_torchrun():
        raise UsageError("gpupar verify starts its own ranks: run it without torchrun, with --nproc-per-node N")
    if cfg.parallel.strategy in (None, "single") or (cfg.parallel.nproc_per_node or 1) < 2:
        raise UsageError("gpupar verify -- python SCRIPT.py compares the script in ranks with one process: pass "
                         "--strategy ddp (or fsdp) and --nproc-per-node N (N >= 2)")


def fresh_dir(path: Path, overwrite: bool) -> Path:
    """A run of this verify: refused when an earlier one left its records there (unless --overwrite)."""
    old = [p for p in (path / name for name in RECORDS) if p.is_file()]
    if old and not overwrite:
        raise UsageError(f"{path} holds an earlier verify's records; pass --overwrite or another --run-dir")
    for p in old:
        p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_here(script: str, args: list[str], out: Path, nudge: bool, no_dropout: bool) -> None:
    """The script on one process, as `python script.py args` runs it, its output kept in output.log."""
    env = {k: v for k, v in os.environ.items() if k != STRATEGY_ENV}
    env.update({DIR_ENV: str(out), NUDGE_ENV: "1" if nudge else "0", NO_DROPOUT_ENV: "1" if no_dropout else "0"})
    log = out / "output.log"
    with open(log, "w") as sink:
        done = subprocess.run([sys.executable, script, *args], env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        last = (log.read_text().strip().splitlines() or [""])[-1]
        raise TrainingError(f"{script} failed on one process (exit {done.returncode}): {last} (output in {log})")


def run_ranks(cfg: Config, script: str, args: list[str], out: Path, no_dropout: bool) -> None:
    """The script in ``--nproc-per-node`` ranks with the strategy: `gpupar run`'s own path."""
    from gpupar.ownloop.script import run_script

    handed = {DIR_ENV: str(out), NUDGE_ENV: "0", NO_DROPOUT_ENV: "1" if no_dropout else "0"}
    saved = {k: os.environ.get(k) for k in (*handed, STRATEGY_ENV)}
    os.environ.update(handed)  # the ranks inherit it
    try:
        run_script(cfg, script, args, ["--strategy", cfg.parallel.strategy, script, *args])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_records(out: Path, script: str, where: str) -> None:
    """One line naming what the script never called, when verify has nothing to judge."""
    if not (out / "step_losses.json").is_file():
        raise UsageError(f"{script} never called gpupar.setup() {where}: gpupar verify records the script's steps "
                         "through it (gp = gpupar.setup(); model, optimizer = gp.setup(model, optimizer))")
    if not json.loads((out / "step_losses.json").read_text()):
        raise UsageError(f"{script} recorded no loss {where}: call gp.backward(loss) (or gp.forward_backward) "
                         "instead of loss.backward(), so verify sees every step")
    if not (out / "model.safetensors").is_file():
        raise UsageError(f"{script} never stepped an optimizer given to gp.setup(model, optimizer) {where}: "
                         "verify records the weights after each optimizer.step()")


def first_loss_fails(reference: Path, strategy: Path, precision: str) -> bool:
    """Whether the strategy's step-1 loss is off beyond the strict step-1 tolerance (then the
    verdict is FAIL whatever the noise reference would show: it widens only later steps)."""
    from gpupar.parity.verdict import FIRST_LOSS_TOL, rel_gap

    first = [json.loads((path / "step_losses.json").read_text())[0] for path in (reference, strategy)]
    return not rel_gap(*first) <= FIRST_LOSS_TOL["fp32" if precision == "fp32" else "low"]


def model_notes(out: Path, dp: int, no_dropout: bool) -> list[str]:
    """The harness's notes on why a model may not match one device, from the names the script's
    model recorded (BatchNorm under data parallelism, layers that draw random numbers)."""
    names = json.loads((out / "notes.json").read_text()) if (out / "notes.json").is_file() else {}
    notes = []
    if names.get("batch_norms") and dp > 1:
        notes.append(f"BatchNorm layers ({', '.join(names['batch_norms'][:3])}) normalise with per-rank batch "
                     f"statistics under data parallelism (each rank sees 1/{dp} of the batch); convert them with "
                     "nn.SyncBatchNorm.convert_sync_batchnorm to use the global batch, as one device does")
    if names.get("random_layers") and not no_dropout:
        notes.append(f"random layers ({', '.join(names['random_layers'][:3])}) draw masks that cannot match "
                     "across a different batch split; pass --no-dropout to verify with p=0 in every run")
    return notes


def verify_script(cfg: Config, given: list[str], command: list[str], rtol: float | None, options,
                  log=print) -> int:
    """Run the script's references and its strategy run, judge, print the report; the exit
    code (0 PASS, 1 FAIL). ``given``: the config flags on the command line; ``options``:
    verify's ``VerifyOptions``."""
    from gpupar.run.rundir import default_path
    from gpupar.topology import ParallelDims
    from gpupar.parity.harness import default_rtol
    from gpupar.parity.verdict import judge, judge_fixed, load_trajectory, report

    options.check()
    script, args = script_of(command)
    check_flags(cfg, given)
    world = cfg.parallel.nproc_per_node
    label = ParallelDims.of(cfg, world, world).describe()
    root = default_path(cfg.train.run_dir)
    calibrated = rtol is None and options.nudge_init
    runs = {name: fresh_dir(root / name, cfg.train.overwrite)
            for name in ("reference", *(("noise",) if calibrated else ()), "strategy")}

    log(f"Running {script} on one process (the reference) ...")
    run_here(script, args, runs["reference"], False, options.no_dropout)
    check_records(runs["reference"], script, "on one process")
    log(f"Running {script} with {label} ...")
    run_ranks(cfg, script, args, runs["strategy"], options.no_dropout)
    check_records(runs["strategy"], script, f"under {label}")
    if calibrated and first_loss_fails(runs["reference"], runs["strategy"], cfg.train.precision):
        del runs["noise"]  # no noise can excuse it: the step-1 loss tolerance is rounding's, not the noise's
        log("The step-1 loss is off beyond rounding: no rounding-noise reference needed")
    elif calibrated:
        log(f"Running {script} on one process with initial weights one ulp off (the rounding-noise reference) ...")
        run_here(script, args, runs["noise"], True, options.no_dropout)

    trajectories = {name: load_trajectory(path) for name, path in runs.items()}
    steps = {name: len(t.losses) for name, t in trajectories.items()}
    common = min(steps.values())
    for t in trajectories.values():
        t.losses = t.losses[:common]  # judged on the steps both took; a different count is a FAIL below
        if not options.first_grads:
            t.first_grads = None
    reference, got = trajectories["reference"], trajectories["strategy"]
    if calibrated:
        noise = [trajectories["noise"]] if "noise" in trajectories else []
        verdict = judge(reference, noise, got, default_rtol(cfg), options.band, cfg.train.precision)
    else:
        verdict = judge_fixed(reference, got, rtol if rtol is not None else default_rtol(cfg))
    verdict.label = label
    verdict.notes = model_notes(runs["reference"], world, options.no_dropout)
    mismatch = (f"the script took {steps['strategy']} steps under {label} and {steps['reference']} on one process "
                "(a per-process batch size? the loader's batch_size is the global batch: gp.setup_dataloader "
                "gives each rank its share)") if steps["strategy"] != steps["reference"] else None
    if mismatch:
        verdict.notes.append(mismatch)
    if not options.save_step_losses:
        for path in runs.values():
            (path / "step_losses.json").unlink(missing_ok=True)
    log(report(verdict))
    if mismatch and verdict.passed:
        log(f"FAIL: {label}: {mismatch}")
    return 0 if verdict.passed and not mismatch else 1
