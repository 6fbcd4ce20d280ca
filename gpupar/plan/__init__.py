"""`gpupar plan`: per-rank memory and step time of every layout, before anything runs.

Memory per rank (the README's "gpupar plan" section states the model in full):
- persistent bytes are exact, from the parameter shapes and the layout: the rank's pipeline
  stage, tensor-parallel layers at their local width, FSDP's dim-0 chunk of each of those;
  gradients like the parameters; Adam's two moments like the parameters plus one 4-byte
  step per tensor (what ``memory.memory_report`` counts); nothing on the device with CPU offload;
- activations are measured by ``plan.probe.probe_step`` on the rank's local model at its real
  micro-batch size (on the meta device), and scaled by the micro-batches a pipeline keeps
  in flight: all M with GPipe, at most p - stage with 1F1B; a rank with several stages
  (interleaved, ZBV, DualPipeV: ``--schedule``) holds its stages' parameters and the
  micro-batches that plan/schedules.py gives per rank;
- the optimizer's temporaries (plan/buffers.py): none for the fused kernel;
- communication buffers: DDP's gradient buckets, FSDP2's all-gather outputs, unsharded
  parameters and gradients and reduce-scatter inputs replayed along the probe's ops
  (plan.buffers.fsdp_buffers), a pipeline stage's receive buffers;
- a runtime allowance (5%, plus 1 GiB on a GPU for the CUDA context and libraries; on gloo,
  plus the largest tensor one collective holds, which gloo's worker thread may free late:
  plan.buffers.gloo_late_bytes).

Step time is a roofline: model FLOPs (``bench.flops.count_step_flops``) split over the ranks
at the measured matmul rate, plus per-op overhead (and on a CPU DTensor's and FSDP2's Python
per layer, measured once by plan/dispatch.py), plus collectives at the measured
latency and bandwidth, plus recomputation, divided by (1 - bubble) with the schedule's
bubble (plan/schedules.py: (p - 1) / (M + p - 1) for GPipe and 1F1B, less for the
interleaved and zero-bubble schedules).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch
from gpupar.config import ACTIVATION_CHECKPOINTING, Config
from gpupar.errors import UsageError
from gpupar.topology import ParallelDims

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GiB', '40GB', '512MiB', '1e9' -> bytes; anything else is a one-line error."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in UNITS | {"": 1} or float(m.group(1)) <= 0:
        raise UsageError(f"--device-memory {text!r} is not a memory size; use a number and one of "
                         "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (for example 80GiB)")
    return int(float(m.group(1)) * UNITS.get(m.group(2), 1))


def parse_worlds(text: str) -> list[int]:
    try:
        worlds = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 1:
        raise UsageError(f"--world-sizes {text!r} must be comma-separated positive rank counts, e.g. 1,2,4,8")
    return sorted(set(worlds))


def default_device_memory(device_type: str, world: int) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(world, 1)


@dataclass
class Row:
    """One layout at one world size, per rank (the rank that needs the most)."""

    layout: str
    world: int
    activation_checkpointing: str
    cpu_offload: bool
    flags: str  # the train flags that run it
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    comm_buffers: int = 0
    runtime: int = 0
    total: int = 0
    device_memory: int = 0
    step_s: float = math.inf
    samples_per_s: float = 0.0
    fits: bool = False
    reason: str = ""
    per_rank: list = dataclasses.field(default_factory=list)  # [{rank, params, grads, optimizer, peak}]
    parallel: dict = dataclasses.field(default_factory=dict)  # the ParallelConfig fields that run it

    @property
    def peak(self) -> int:
        """Predicted peak of allocated bytes (what the allowance is added to)."""
        return self.total - self.runtime


LAYOUT_FIELDS = ("strategy", "dp", "tp", "pp", "dp_replicate", "dp_shard", "schedule", "activation_checkpointing",
                 "cpu_offload")


def candidates(world: int) -> list[tuple[ParallelDims, str]]:
    """Every ParallelDims for ``world`` ranks, with its --strategy shorthand (how a user asks for it)."""
    out: list[tuple[ParallelDims, str]] = []
    for pp in range(1, world + 1):
        for tp in range(1, world // pp + 1):
            if world % (pp * tp):
                continue
            dp = world // (pp * tp)
            if pp == tp == 1:
                out.append((ParallelDims(1, dp, 1, 1), "single" if dp == 1 else "ddp"))
            if dp > 1 or pp * tp > 1:
                out.append((ParallelDims(pp, 1, dp, tp), "fsdp"))
            for r in range(2, dp):
                if dp % r == 0:
                    out.append((ParallelDims(pp, r, dp // r, tp), "hsdp"))
    return out


def layout_config(cfg: Config, dims: ParallelDims, strategy: str, schedule: str, ac: str, offload: bool) -> Config:
    """A copy of ``cfg`` asking for ``dims`` with the usual flags."""
    c = copy.deepcopy(cfg)
    p = c.parallel
    p.strategy, p.tp, p.pp, p.schedule = strategy, dims.tp, dims.pp, schedule
    p.dp, p.dp_replicate, p.dp_shard = (None, None, None)
    if strategy == "hsdp":
        p.dp_replicate, p.dp_shard = dims.dp_replicate, dims.dp_shard
    elif strategy == "fsdp":
        p.dp = dims.dp_shard
    p.activation_checkpointing, p.cpu_offload, p.plan = ac, offload, None
    return c


def flags_of(c: Config, dims: ParallelDims) -> str:
    p = c.parallel
    out = [f"--nproc-per-node {dims.world}"] if dims.world > 1 else []
    if p.strategy != "single":
        out.append(f"--strategy {p.strategy}")
    if p.strategy == "hsdp":
        out.append(f"--dp-replicate {p.dp_replicate} --dp-shard {p.dp_shard}")
    out += [f"--{n} {getattr(p, n)}" for n in ("tp", "pp") if getattr(p, n) > 1]
    if dims.pp_enabled:
        out.append(f"--schedule {p.schedule}")
    if p.activation_checkpointing != "none":
        out.append(f"--activation-checkpointing {p.activation_checkpointing}")
    if p.cpu_offload:
        out.append("--cpu-offload")
    return " ".join(out)


def plan_rows(cfg: Config, worlds: list[int], device_memory: int | None, device_type: str, machine) -> list[Row]:
    """Every layout x activation checkpointing x CPU offload at every world size, sorted by throughput
    (layouts that fit first)."""
    from gpupar.job import preflight
    from gpupar.plan.memory import Context, predict_memory

    ctx = Context.build(cfg)
    rows: list[Row] = []
    for world in worlds:
        memory = device_memory or default_device_memory(device_type, world)
        ranks_per_node = cfg.parallel.nproc_per_node or world
        for dims, strategy in candidates(world):
            # gpipe and 1f1b always; the interleaved and zero-bubble schedules where --schedule asks.
            schedules = tuple(dict.fromkeys(("gpipe", "1f1b", cfg.parallel.schedule))) if dims.pp_enabled \
                else (cfg.parallel.schedule,)
            for schedule in schedules:
                base = layout_config(cfg, dims, strategy, schedule, "none", False)
                reason = ""
                try:  # the launcher's own resolution and checks
                    resolved = ParallelDims.of(base, world, ranks_per_node)
                    if resolved.degrees != dims.degrees:
                        continue  # another spelling of a layout already listed
                    dims = resolved  # with its process mode and micro-batch count
                    preflight(base, world, ranks_per_node)
                except UsageError as exc:
                    reason = str(exc)
                for ac in ACTIVATION_CHECKPOINTING:
                    # CPU offload only where there is a device to offload from (a GPU).
                    for offload in ((False, True) if dims.fsdp_enabled and device_type == "cuda" else (False,)):
                        c = layout_config(cfg, dims, strategy, schedule, ac, offload)
                        name = dims.describe(schedule if dims.pp_enabled else "")
                        row = Row(name, world, ac, offload, flags_of(c, dims), device_memory=memory, reason=reason,
                                  parallel={k: getattr(c.parallel, k) for k in LAYOUT_FIELDS})
                        if not row.reason:
                            predict_memory(ctx, c, dims, row, device_type, machine)
                            row.fits = row.total <= memory
                            if not row.fits:
                                row.reason = f"needs {fmt_bytes(row.total)} > {fmt_bytes(memory)} per rank"
                        rows.append(row)
    rows.sort(key=lambda r: (not r.fits, bool(r.reason) and not r.total, -r.samples_per_s))
    return rows


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}B"


def format_table(rows: list[Row], limit: int | None = None) -> str:
    head = (f"{'layout':<34} {'W':>2} {'AC':<9} {'off':<3} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
            f"{'comm':>8} {'runtime':>8} {'total':>8} {'step ms':>9} {'samples/s':>10}  fits")
    lines = [head]
    for r in rows[:limit]:
        if r.total:
            lines.append(f"{r.layout:<34} {r.world:>2} {r.activation_checkpointing:<9} {'yes' if r.cpu_offload else '':<3} "
                         f"{fmt_bytes(r.params):>8} {fmt_bytes(r.grads):>8} {fmt_bytes(r.optimizer):>8} "
                         f"{fmt_bytes(r.activations):>8} {fmt_bytes(r.comm_buffers):>8} {fmt_bytes(r.runtime):>8} "
                         f"{fmt_bytes(r.total):>8} {r.step_s * 1e3:9.2f} {r.samples_per_s:10.0f}  "
                         + ("yes" if r.fits else f"no: {r.reason}"))
        else:
            lines.append(f"{r.layout:<34} {r.world:>2} {r.activation_checkpointing:<9} {'yes' if r.cpu_offload else '':<3} "
                         f"cannot run: {r.reason}")
    return "\n".join(lines)


def rows_json(rows: list[Row], machine) -> str:
    from gpupar.plan.probe import machine_dict

    return json.dumps({"machine": machine_dict(machine),
                       "rows": [dataclasses.asdict(r) | {"peak": r.peak} for r in rows]}, indent=1)


def best_fit(rows: list[Row]) -> Row:
    fitting = [r for r in rows if r.fits]
    if not fitting:
        first = next((r for r in rows if r.total), rows[0])
        raise UsageError(f"--plan auto: no layout fits; the smallest needs {fmt_bytes(first.total)} per rank "
                         f"({first.reason})")
    return fitting[0]


def run_plan(cfg: Config, worlds: list[int], device_memory: str | None, as_json: bool,
             machine=None, out=print) -> list[Row]:
    """What `gpupar plan` prints: the table (or JSON) of every layout."""
    from gpupar.devices import pick_device
    from gpupar.plan.probe import measure_machine

    memory = parse_memory(device_memory) if device_memory else None
    device_type = pick_device(cfg.train.device).type
    machine = machine or measure_machine(device_type, cfg.train.precision, worlds)
    rows = plan_rows(cfg, worlds, memory, device_type, machine)
    out(rows_json(rows, machine) if as_json else format_table(rows))
    return rows


def apply_auto(cfg: Config, machine=None, out=print) -> Config:
    """`--plan auto`: the fastest layout that fits at --nproc-per-node ranks, as this config."""
    from gpupar.devices import pick_device
    from gpupar.plan.probe import measure_machine

    world = (cfg.parallel.nproc_per_node or 1) * cfg.parallel.nnodes
    device_type = pick_device(cfg.train.device).type
    memory = parse_memory(cfg.parallel.device_memory) if cfg.parallel.device_memory else None
    machine = machine or measure_machine(device_type, cfg.train.precision, [world])
    best = best_fit(plan_rows(cfg, [world], memory, device_type, machine))
    out(f"gpupar plan: chose {best.layout}, activation checkpointing {best.activation_checkpointing}"
        f"{', cpu offload' if best.cpu_offload else ''} ({fmt_bytes(best.total)} of {fmt_bytes(best.device_memory)} "
        f"per rank, {best.step_s * 1e3:.1f} ms/step predicted): {best.flags}")
    chosen = copy.deepcopy(cfg)
    for name, value in best.parallel.items():
        setattr(chosen.parallel, name, value)
    chosen.parallel.plan = None
    return chosen.validate()
