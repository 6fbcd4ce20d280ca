"""The parity harness: prove that a parallel run trains the same model as one device.

It trains the single-device reference in this process and the strategy in its own ranks,
from the same config: the same seed (so the same initial weights and data), the same
sample order and the same global batch. It then compares the loss at every step and the
final parameters.

Tolerances are relative: ``|loss_s - loss_ref| / |loss_ref|`` per step and
``max|p_s - p_ref| / max|p_ref|`` per parameter tensor. In fp32 the only differences come
from floating-point summation order (a gradient all-reduce sums W partial means instead of
one), which stays orders of magnitude below the default 1e-5 over short runs; bf16 and fp16
round every matmul, so their default is 2e-2.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gpupar.weights import load_weights
from gpupar.config import Config, ParallelConfig, layout
from gpupar.devices import pick_device
from gpupar.errors import UsageError
from gpupar.job import default_run_dir, train_from_config
from gpupar.topology import Topology


@dataclass
class Verdict:
    steps: list[tuple[int, float, float, float]]  # (step, reference loss, strategy loss, relative gap)
    param_gaps: dict[str, float]  # parameter name -> max|delta| / max|reference|
    max_abs_param_delta: float
    rtol: float
    label: str = "strategy"  # what ran, e.g. "ddp(dp=2)"

    @property
    def first_diverging_step(self) -> int | None:
        return next((s for s, _, _, gap in self.steps if not gap <= self.rtol), None)

    @property
    def worst_parameter(self) -> tuple[str, float]:
        return max(self.param_gaps.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)

    @property
    def passed(self) -> bool:
        return self.first_diverging_step is None and all(g <= self.rtol for g in self.param_gaps.values())


def default_rtol(cfg: Config) -> float:
    if cfg.train.precision != "fp32":
        return 2e-2
    # Tensor parallel splits every sharded matmul's inner sum across ranks and all-reduces the
    # partials: rounding differs at every layer of every step (not once per step, as in DDP).
    # Measured on the GPT (--dp 2 --tp 2, 100 Adam steps): 3.3e-5 in the loss, 1.3e-5 in parameters.
    return 1e-4 if cfg.parallel.tp > 1 else 1e-5


def compare(ref_dir: Path, run_dir: Path, rtol: float) -> Verdict:
    ref_losses = json.loads((ref_dir / "step_losses.json").read_text())
    run_losses = json.loads((run_dir / "step_losses.json").read_text())
    if len(ref_losses) != len(run_losses):
        raise RuntimeError(f"the strategy ran {len(run_losses)} steps, the reference {len(ref_losses)}")
    steps = [(i + 1, a, b, abs(b - a) / max(abs(a), 1e-12)) for i, (a, b) in enumerate(zip(ref_losses, run_losses))]
    ref, got = load_weights(ref_dir / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    if ref.keys() != got.keys():
        raise RuntimeError(f"parameter names differ: {sorted(ref.keys() ^ got.keys())[:4]}")
    gaps, max_abs = {}, 0.0
    for name, r in ref.items():
        delta = (got[name].double() - r.double()).abs().max().item()
        gaps[name] = delta / max(r.double().abs().max().item(), 1e-12)
        max_abs = max(max_abs, delta)
    return Verdict(steps, gaps, max_abs, rtol)


def run_verify(cfg: Config, rtol: float | None = None, log: Callable[[str], None] = print) -> Verdict:
    """Check the layout, train the reference here and the strategy where ``launch.run`` puts
    it (its ranks, or this process), then compare."""
    from gpupar import launch

    lay = layout(cfg.parallel)
    if lay.process == "one-device":
        raise UsageError("gpupar verify compares a parallel layout with one device: pass --strategy ddp "
                         "(or another), or --dp/--tp/--pp")
    dims = launch.check(cfg)  # before the reference trains: a bad layout costs nothing
    label = dims.describe(cfg.parallel.schedule if dims.pp > 1 else "") if lay.ranks else lay.process
    root = default_run_dir(cfg)
    rtol = default_rtol(cfg) if rtol is None else rtol

    reference = copy.deepcopy(cfg)
    reference.parallel = ParallelConfig()
    reference.train.run_dir, reference.train.save_step_losses = str(root / "reference"), True
    reference.train.progress = False
    log("Training the single-device reference ...")
    train_from_config(reference, Topology.single(pick_device(cfg.train.device)), log=lambda _: None)

    strategy = copy.deepcopy(cfg)
    strategy.train.run_dir, strategy.train.save_step_losses = str(root / "strategy"), True
    strategy.train.progress = False
    log(f"Training with {label} ...")
    launch.run(strategy, "train", lambda topo: train_from_config(strategy, topo, log=lambda _: None))
    verdict = compare(root / "reference", root / "strategy", rtol)
    verdict.label = label
    return verdict


def report(verdict: Verdict, max_rows: int = 12) -> str:
    """The table (step, reference loss, strategy loss, relative gap, max |dparam|) and the verdict."""
    n, label = len(verdict.steps), verdict.label
    shown = sorted({0, n - 1, *range(0, n, max(1, n // (max_rows - 2)))} |
                   ({verdict.first_diverging_step - 1} if verdict.first_diverging_step else set()))
    lines = [f"{'step':>6}  {'reference loss':>16}  {label + ' loss':>16}  {'rel. gap':>9}  {'max |dparam|':>12}"]
    for i in shown:
        step, a, b, gap = verdict.steps[i]
        final = f"{verdict.max_abs_param_delta:12.3e}" if i == n - 1 else f"{'':>12}"
        lines.append(f"{step:>6}  {a:16.8f}  {b:16.8f}  {gap:9.2e}  {final}")
    name, gap = verdict.worst_parameter
    lines.append(f"final parameters: worst {name!r} relative gap {gap:.2e} (tolerance {verdict.rtol:.0e})")
    if verdict.passed:
        lines.append(f"PASS: {label} matches the single-device reference within {verdict.rtol:.0e} relative")
    else:
        step = verdict.first_diverging_step
        where = f"first diverging step {step}" if step else f"parameters diverge, worst {name!r}"
        lines.append(f"FAIL: {label} differs from the reference ({where}; tolerance {verdict.rtol:.0e})")
    return "\n".join(lines)
