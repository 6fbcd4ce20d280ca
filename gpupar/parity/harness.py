"""The parity harness: prove that a parallel run trains the same model as one device.

It trains the single-device reference in this process and the strategy in its own ranks,
from the same config: the same seed (so the same initial weights and data), the same sample
order and the same global batch. By default it also trains a second single-device reference
whose initial weights are one ulp off (``gpupar.parity.noise``): its gap to the first is the run's
own rounding noise, and ``gpupar.parity.verdict.judge`` holds the strategy to a band around it, after
a strict step 1. ``--rtol`` keeps the fixed-tolerance mode (no noise reference).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gpupar.config import Config, ParallelConfig, layout
from gpupar.errors import UsageError
from gpupar.job import Probes, train_from_config
from gpupar.launch.elastic import launched_by_torchrun
from gpupar.problem import load_problem
from gpupar.run.rundir import default_path
from gpupar.parity.noise import batch_norms, disable_dropout, nudge_weights, random_layers, record_first_grads
from gpupar.parity.verdict import Verdict, judge, judge_fixed, load_trajectory, passes_step_one

RUNS = ("reference", "noise", "order", "strategy")  # the run directories under verify's --run-dir


@dataclass(frozen=True)
class VerifyOptions:
    """verify's own knobs: flags of `gpupar verify` only, never of the config (train, bench,
    sweep and plan do not have them)."""

    band: float = 10.0
    """Every step's gap must stay within this factor of the run's own rounding noise (or the fixed floor)."""
    no_dropout: bool = False
    """p=0 in every dropout layer, in every run (a dropout mask cannot match across a different batch split)."""
    nudge_init: bool = True
    """Train the rounding-noise reference (initial weights one ulp off); false judges with the fixed tolerance."""
    first_grads: bool = True
    """Compare the whole model's step-1 gradients (false: the losses and the final tensors only)."""
    save_step_losses: bool = True
    """Keep every run's step_losses.json after the verdict (false deletes them once judged)."""

    def check(self) -> "VerifyOptions":
        if not (self.band >= 1 and math.isfinite(self.band)):
            raise UsageError(f"--band {self.band} must be a finite factor >= 1")
        return self


def probes(options: VerifyOptions, nudge: bool, first_grads: bool) -> Probes:
    """What one run of verify records (and, for the noise reference, the nudge)."""
    def prepare(model) -> None:
        if options.no_dropout:
            disable_dropout(model)
        if nudge:  # verify's rounding-noise reference
            nudge_weights(model)

    wrap = (lambda step, model, topo, run_dir: record_first_grads(step, model, topo,
                                                                  Path(run_dir) / "first_grads.safetensors"))
    return Probes(prepare, wrap if first_grads else None, step_losses=True)


def default_rtol(cfg: Config) -> float:
    """The fixed tolerance (--rtol's default, and the calibrated verdict's floor)."""
    if cfg.train.precision != "fp32":
        return 2e-2
    # Tensor parallel splits every sharded matmul's inner sum across ranks and all-reduces the
    # partials: rounding differs at every layer of every step (not once per step, as in DDP).
    # Measured on the GPT (--dp 2 --tp 2, 100 Adam steps): 3.3e-5 in the loss, 1.3e-5 in parameters.
    return 1e-4 if cfg.parallel.tp > 1 else 1e-5


def model_notes(cfg: Config, dp: int, no_dropout: bool = False) -> list[str]:
    """Why this model may not match one device whatever the strategy does: BatchNorm without
    --sync-bn under data parallelism, and layers that draw random numbers."""
    model = load_problem(cfg, meta=True).model
    notes = []
    norms = batch_norms(model)
    if norms and dp > 1 and not cfg.parallel.sync_bn:
        notes.append(f"BatchNorm layers ({', '.join(norms[:3])}) normalise with per-rank batch statistics under "
                     f"data parallelism (each rank sees 1/{dp} of the batch); pass --sync-bn to use the global "
                     "batch, as one device does")
    drops = random_layers(model)
    if drops and not no_dropout:
        notes.append(f"random layers ({', '.join(drops[:3])}) draw masks that cannot match across a different "
                     "batch split; pass --no-dropout to verify the parallelisation with p=0 in every run")
    return notes


def order_reference(cfg: Config, root: Path, train: Callable[[int], None], log) -> list:
    """The summation-order reference: one device, each batch split into twice the run's
    micro-batches, so every batch reduction sums in another order, as a data-parallel all-reduce
    does (on some models that noise is 10x the nudge's). Left out where the split changes the
    math (BatchNorm's statistics over a micro-batch), where the batch does not split evenly,
    or where it is not rounding at step 1 (``passes_step_one``)."""
    split = 2 * cfg.train.grad_accum
    if batch_norms(load_problem(cfg, meta=True).model):
        return []
    log(f"Training the summation-order reference (--grad-accum {split} on one device) ...")
    try:
        train(split)
    except UsageError as exc:  # the batch does not split into `split` micro-batches
        log(f"note: no summation-order reference ({exc})")
        return []
    reference, order = load_trajectory(root / "reference"), load_trajectory(root / "order")
    if not passes_step_one(reference, order, cfg.train.precision):
        log("note: the summation-order reference differs beyond rounding at step 1; judged by the nudge alone")
        return []
    return [order]


def run_verify(cfg: Config, rtol: float | None = None, log: Callable[[str], None] = print,
               options: VerifyOptions = VerifyOptions()) -> Verdict | None:
    """Check the layout, train the reference(s) here and the strategy where ``launch.run`` puts
    it (its ranks, or this process), then judge. In one of the strategy's ranks (started by
    this harness) it trains that rank's part and returns None."""
    from gpupar import launch

    options.check()
    if launched_by_torchrun():
        if "GPUPAR_LAUNCHER_PID" not in os.environ:
            raise UsageError("gpupar verify starts its own ranks (and trains the single-device references "
                             "itself): run it without torchrun, with --nproc-per-node N")
        # The strategy's ranks log as `gpupar train` does: its start line, its epochs.
        launch.run(cfg, "verify", lambda topo, run: train_from_config(cfg, topo, run, print,
                                                                         probes(options, False, options.first_grads)))
        return None
    lay = layout(cfg.parallel)
    if lay.process == "one-device":
        raise UsageError("gpupar verify compares a parallel layout with one device: pass --strategy ddp "
                         "(or another), or --dp/--tp/--pp")
    dims = launch.check(cfg)  # before the reference trains: a bad layout costs nothing
    label = dims.describe(cfg.parallel.schedule if dims.pp_enabled else "") if lay.ranks else lay.process
    notes = model_notes(cfg, dims.dp if lay.ranks else 1, options.no_dropout)
    for note in notes:
        log(f"note: {note}")
    root = default_path(cfg.train.run_dir)
    calibrated = rtol is None and options.nudge_init
    grads = rtol is None and options.first_grads

    def train(name: str, single: bool, nudge: bool = False, grad_accum: int | None = None) -> None:
        c = copy.deepcopy(cfg)
        if single:
            c.parallel = ParallelConfig()
        c.train.grad_accum = grad_accum or c.train.grad_accum
        c.train.run_dir, c.train.progress = str(root / name), False
        extra = [] if single else [f"--first-grads={str(grads).lower()}",
                                   f"--no-dropout={str(options.no_dropout).lower()}"]
        # Checked above, before the reference trained: started without checking it again.
        launch.run(c, "verify", lambda topo, run: train_from_config(c, topo, run, lambda _: None,
                                                                       probes(options, nudge, grads)),
                   extra, checked=True)

    log("Training the single-device reference ...")
    train("reference", True)
    noises = []
    if calibrated:
        log("Training the rounding-noise reference (initial weights one ulp off) ...")
        train("noise", True, nudge=True)
        noises.append(load_trajectory(root / "noise"))
        noises += order_reference(cfg, root, lambda split: train("order", True, grad_accum=split), log)
    log(f"Training with {label} ...")
    train("strategy", False)
    reference, got = load_trajectory(root / "reference"), load_trajectory(root / "strategy")
    if calibrated:
        verdict = judge(reference, noises, got, default_rtol(cfg), options.band, cfg.train.precision)
    else:
        verdict = judge_fixed(reference, got, rtol if rtol is not None else default_rtol(cfg))
    if not options.save_step_losses:
        for name in RUNS:
            (root / name / "step_losses.json").unlink(missing_ok=True)
    verdict.label, verdict.notes = label, notes
    return verdict
