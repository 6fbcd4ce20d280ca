"""The parity harness: prove that a parallel run trains the same model as one device.

It trains the single-device reference in this process and the strategy in its own ranks,
from the same config: the same seed (so the same initial weights and data), the same sample
order and the same global batch. By default it also trains a second single-device reference
whose initial weights are one ulp off (``gpupar.noise``): its gap to the first is the run's
own rounding noise, and ``gpupar.verdict.judge`` holds the strategy to a band around it, after
a strict step 1. ``--rtol`` keeps the fixed-tolerance mode (no noise reference).
"""

from __future__ import annotations

import copy
from typing import Callable

from gpupar.config import Config, ParallelConfig, layout
from gpupar.devices import pick_device
from gpupar.errors import UsageError
from gpupar.job import default_run_dir, load_problem, train_from_config
from gpupar.noise import batch_norms, random_layers
from gpupar.topology import Topology
from gpupar.verdict import Verdict, compare, judge, judge_fixed, load_trajectory, report  # noqa: F401

__all__ = ["Verdict", "compare", "default_rtol", "model_notes", "report", "run_verify"]


def default_rtol(cfg: Config) -> float:
    """The fixed tolerance (--rtol's default, and the calibrated verdict's floor)."""
    if cfg.train.precision != "fp32":
        return 2e-2
    # Tensor parallel splits every sharded matmul's inner sum across ranks and all-reduces the
    # partials: rounding differs at every layer of every step (not once per step, as in DDP).
    # Measured on the GPT (--dp 2 --tp 2, 100 Adam steps): 3.3e-5 in the loss, 1.3e-5 in parameters.
    return 1e-4 if cfg.parallel.tp > 1 else 1e-5


def model_notes(cfg: Config, dp: int) -> list[str]:
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
    if drops and not cfg.verify.no_dropout:
        notes.append(f"random layers ({', '.join(drops[:3])}) draw masks that cannot match across a different "
                     "batch split; pass --no-dropout to verify the parallelisation with p=0 in every run")
    return notes


def run_verify(cfg: Config, rtol: float | None = None, log: Callable[[str], None] = print) -> Verdict:
    """Check the layout, train the reference(s) here and the strategy where ``launch.run`` puts
    it (its ranks, or this process), then judge."""
    from gpupar import launch

    lay = layout(cfg.parallel)
    if lay.process == "one-device":
        raise UsageError("gpupar verify compares a parallel layout with one device: pass --strategy ddp "
                         "(or another), or --dp/--tp/--pp")
    dims = launch.check(cfg)  # before the reference trains: a bad layout costs nothing
    label = dims.describe(cfg.parallel.schedule if dims.pp > 1 else "") if lay.ranks else lay.process
    notes = model_notes(cfg, dims.dp if lay.ranks else 1)
    for note in notes:
        log(f"note: {note}")
    root = default_run_dir(cfg)
    calibrated = rtol is None

    def run_config(name: str, single: bool) -> Config:
        c = copy.deepcopy(cfg)
        if single:
            c.parallel = ParallelConfig()
        c.train.run_dir, c.train.save_step_losses, c.train.progress = str(root / name), True, False
        c.verify.first_grads = calibrated
        return c

    here = Topology.single(pick_device(cfg.train.device))
    log("Training the single-device reference ...")
    train_from_config(run_config("reference", True), here, log=lambda _: None)
    if calibrated:
        log("Training the rounding-noise reference (initial weights one ulp off) ...")
        noise = run_config("noise", True)
        noise.verify.nudge_init = True
        train_from_config(noise, here, log=lambda _: None)
    strategy = run_config("strategy", False)
    log(f"Training with {label} ...")
    # Checked above, before the reference trained: start it without checking it again.
    launch.start(strategy, "train", lambda topo: train_from_config(strategy, topo, log=lambda _: None))
    reference, got = load_trajectory(root / "reference"), load_trajectory(root / "strategy")
    if calibrated:
        verdict = judge(reference, load_trajectory(root / "noise"), got, default_rtol(cfg), cfg.verify.band,
                        cfg.train.precision)
    else:
        verdict = judge_fixed(reference, got, rtol)
    verdict.label, verdict.notes = label, notes
    return verdict
