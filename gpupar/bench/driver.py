"""`gpupar bench`: the same training workload timed across strategies and world sizes.

"Which strategy should I use, and what did I gain?" Each (strategy, world size) pair trains
the same model on the same global batch in fresh processes, through gpupar's own training
loop (``training.loop.fit``), and reports the median step time, samples/s (tokens/s for sequence models),
per-rank peak memory, the model FLOP/s and MFU, and the scaling efficiency against world 1.
A pair that fails or is not supported is reported as skipped, with the reason; it never
stops the run.

The driver writes each combination's config, starts its ranks (``gpupar bench-worker``),
reads their result and derives throughput, MFU and scaling (``add_derived``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpupar.measure.flops import count_step_flops, gpu_peak_tflops
from gpupar.config import Config
from gpupar.config_file import to_toml
from gpupar.errors import TrainingError, UsageError
from gpupar.run.files import atomic_write_text

STRATEGIES = ("single", "ddp", "fsdp", "tp", "pp")

@dataclass
class BenchSpec:
    """One `gpupar bench` invocation: the base training config and what to sweep."""

    base: Config
    strategies: list[str]
    world_sizes: list[int]
    steps: int = 20
    warmup: int = 3
    out: Path = Path("runs/bench")
    peers: list[str] = field(default_factory=list)
    peak_tflops: float | None = None  # overrides the table / the CPU probe
    threads_per_rank: int | None = None  # CPU: OMP threads in each rank (default: cores / ranks)
    command: str = ""

def global_batch(base: Config) -> int:
    return base.train.batch_size or base.data.samples

def strategy_config(base: Config, strategy: str, world: int, steps: int, warmup: int) -> Config:
    """The training config that runs ``strategy`` on ``world`` ranks; UsageError when it cannot.

    The data hold exactly one global batch, so each epoch is one step and every
    strategy walks the identical batch sequence.
    """
    cfg = copy.deepcopy(base)
    p = cfg.parallel
    if strategy == "single":
        if world != 1:
            raise UsageError(f"single runs on one device; world size {world} does not apply")
        p.strategy, p.nproc_per_node = "single", None
    elif strategy == "ddp":
        p.strategy, p.nproc_per_node = "ddp", world
    elif strategy == "fsdp":
        p.strategy, p.nproc_per_node = "fsdp", world
    elif strategy == "tp":
        _set_degree(cfg, "tp", world)
    elif strategy == "pp":
        _set_degree(cfg, "pp", world)
    else:
        raise UsageError(f"--strategies: {strategy!r} is not one of: {', '.join(STRATEGIES)}")
    batch = global_batch(base)
    cfg.data.samples, cfg.data.val_fraction, cfg.data.shuffle = batch, 0.0, False
    cfg.train.batch_size, cfg.train.grad_accum = batch, base.train.grad_accum
    # With --data, an epoch may hold several batches: max_steps stops at the same count.
    cfg.train.epochs, cfg.train.max_steps = warmup + steps, warmup + steps
    cfg.train.log_every, cfg.train.progress, cfg.train.save_step_losses = warmup + steps, False, False
    return cfg.validate()

def _set_degree(cfg: Config, name: str, world: int) -> None:
    """Tensor / pipeline parallel over all ranks: ``--tp W`` / ``--pp W``."""
    setattr(cfg.parallel, name, world)
    cfg.parallel.strategy, cfg.parallel.nproc_per_node = name, world

def check_runnable(world: int, device: torch.device) -> None:
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise UsageError(f"needs {world} GPUs, {torch.cuda.device_count()} visible")

def run_combination(cfg: Config, out_dir: Path, steps: int, warmup: int, peer: str | None = None,
                    threads: int | None = None) -> dict:
    """Run one combination in fresh processes; its result dict, or {"skipped": reason}."""
    from gpupar import launch

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.toml", to_toml(cfg))
    result = out_dir / "result.json"
    for stale in [result, *out_dir.glob("result.json.rank*.err")]:
        stale.unlink(missing_ok=True)
    argv = ["bench-worker", "--config", str(out_dir / "config.toml"), "--result", str(result),
            "--steps", str(steps), "--warmup", str(warmup)] + (["--peer", peer] if peer else [])
    saved = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        if cfg.parallel.nproc_per_node is None:  # one device, no process group
            env = dict(os.environ)
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(name, None)
            proc = subprocess.run([sys.executable, "-m", "gpupar", *argv], capture_output=True, text=True, env=env)
            failure = None if proc.returncode == 0 else _last_line(proc.stderr)
        else:
            try:
                launch.run(cfg, argv[0], None, argv[1:], claim=False, checked=True)
                failure = None
            except (TrainingError, UsageError) as exc:
                failure = str(exc)
    finally:
        if threads:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    if failure is None and result.is_file():
        return json.loads(result.read_text())
    return {"skipped": _failure_reason(out_dir, failure)}

def _failure_reason(out_dir: Path, failure: str | None) -> str:
    """The first failing rank's own message (the launcher names that rank); its peers only
    report a closed connection."""
    named = re.match(r"rank (\d+) failed", failure or "")
    errors = sorted(out_dir.glob("result.json.rank*.err"))
    if named and (out_dir / f"result.json.rank{named.group(1)}.err").is_file():
        errors.insert(0, out_dir / f"result.json.rank{named.group(1)}.err")
    if errors:
        return errors[0].read_text().strip()
    return failure or "no result written"

def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed without a message"

def environment(device: torch.device, command: str) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
           "cpu_model": _cpu_model(), "device_type": device.type, "devices": []}
    if device.type == "cuda":
        env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
    return env

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

def run_bench(spec: BenchSpec, log=print) -> dict:
    """Every combination of spec.strategies x spec.world_sizes, then the peers; returns bench.json's dict."""
    from gpupar.devices import pick_device
    from gpupar.job import load_problem
    from gpupar.training.recipe import make_loss

    base = spec.base
    device = pick_device(base.train.device)
    batch = global_batch(base)
    if spec.steps < 2 or spec.warmup < 1:
        raise UsageError(f"--steps {spec.steps} --warmup {spec.warmup}: need at least 2 timed steps and "
                         "1 warm-up step")
    if spec.threads_per_rank is not None and spec.threads_per_rank < 1:
        raise UsageError(f"--threads-per-rank {spec.threads_per_rank} must be a positive integer")
    if spec.peak_tflops is not None and not spec.peak_tflops > 0:
        raise UsageError(f"--peak-tflops {spec.peak_tflops} must be > 0")

    # Model FLOPs of one step of the global batch, counted once: every strategy does this work.
    problem = load_problem(strategy_config(base, "single", 1, spec.steps, spec.warmup))
    flops = count_step_flops(problem.model, problem.X[:batch], problem.y[:batch], make_loss(base, problem.spec.loss))
    precision = base.train.precision
    if spec.peak_tflops:
        peak, peak_source = spec.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, precision)
        peak_source = f"data sheet, {name}, dense {precision}" if peak else f"unknown peak for {name}"
    else:
        peak, peak_source = None, f"matmul probe, 1024x1024 {precision}, in every rank before training, summed"

    env = environment(device, spec.command)
    env.update(peak_tflops_per_device=peak, peak_source=peak_source)
    seq_len = problem.spec.tokens_per_sample if problem.spec.tokens_per_sample > 1 else None
    rows = []
    for strategy in spec.strategies:
        for world in spec.world_sizes:
            row = {"strategy": strategy, "world_size": world}
            try:
                cfg = strategy_config(base, strategy, world, spec.steps, spec.warmup)
                check_runnable(world, device)
            except UsageError as exc:
                row["skipped"] = str(exc)
            else:
                log(f"bench: {strategy} x {world} ...")
                row.update(run_combination(cfg, spec.out / "runs" / f"{strategy}-w{world}", spec.steps,
                                           spec.warmup, threads=spec.threads_per_rank))
            rows.append(row)

    peer_rows = []  # DDP's cost is communication, so peers run at world sizes above 1
    for world in [w for w in spec.world_sizes if w > 1] if spec.peers else []:
        for peer in spec.peers:
            row = {"framework": peer, "world_size": world}
            try:
                cfg = strategy_config(base, "ddp", world, spec.steps, spec.warmup)
                check_runnable(world, device)
                _check_peer_installed(peer)
            except UsageError as exc:
                row["skipped"] = str(exc)
            else:
                log(f"bench: peer {peer} (DDP) x {world} ...")
                row.update(run_combination(cfg, spec.out / "runs" / f"peer-{peer}-w{world}", spec.steps,
                                           spec.warmup, peer=peer, threads=spec.threads_per_rank))
            peer_rows.append(row)

    summary = {"environment": env, "model": base.model.name, "global_batch": batch, "seq_len": seq_len,
               "precision": precision, "steps": spec.steps, "warmup": spec.warmup, "flops_per_step": flops,
               "results": rows, "peers": peer_rows}
    add_derived(summary, device.type)
    return summary

def _check_peer_installed(peer: str) -> None:
    from gpupar.bench.peers import PEERS, missing_reason

    if peer not in PEERS:
        raise UsageError(f"--peers: {peer!r} is not one of: {', '.join(PEERS)}")
    reason = missing_reason(peer)
    if reason:
        raise UsageError(reason)

def add_derived(summary: dict, device_type: str) -> None:
    """Throughput, FLOP/s, MFU and scaling efficiency from the raw step times (in place)."""
    batch, flops = summary["global_batch"], summary["flops_per_step"]
    peak = summary["environment"]["peak_tflops_per_device"]
    for row in summary["results"] + summary["peers"]:
        if "skipped" in row:
            continue
        step = row["median_step_s"]
        row["samples_per_s"] = batch / step
        if summary["seq_len"]:
            row["tokens_per_s"] = batch * summary["seq_len"] / step
        row["window_samples_per_s"] = batch * len(row["step_s"]) / row["window_s"] if row["window_s"] else None
        row["achieved_tflops"] = flops / step / 1e12
        # GPUs add peak with every rank; CPU ranks share one machine's cores, measured by their probes.
        if peak:
            row["peak_tflops"] = peak * (row["world_size"] if device_type == "cuda" else 1)
        else:
            row["peak_tflops"] = row.get("cpu_probe_tflops")
        row["mfu"] = row["achieved_tflops"] / row["peak_tflops"] if row["peak_tflops"] else None
        row["peak_memory_per_rank_mib"] = max(row["memory_per_rank_bytes"]) / 2**20

    ok = {(r["strategy"], r["world_size"]): r for r in summary["results"] if "skipped" not in r}
    for row in summary["results"]:
        if "skipped" in row:
            continue
        base = ok.get((row["strategy"], 1)) or ok.get(("single", 1))
        if base is not None:
            row["baseline"] = f"{base['strategy']} x 1"
            row["scaling_efficiency"] = row["samples_per_s"] / (row["world_size"] * base["samples_per_s"])

    gpupar_ddp = {r["world_size"]: r for r in summary["results"] if r["strategy"] == "ddp" and "skipped" not in r}
    raw = {r["world_size"]: r for r in summary["peers"] if r["framework"] == "raw" and "skipped" not in r}
    for row in summary["peers"]:
        if "skipped" in row:
            continue
        world = row["world_size"]
        if world in gpupar_ddp:
            row["step_vs_gpupar"] = row["median_step_s"] / gpupar_ddp[world]["median_step_s"]
        if world in raw:
            row["step_vs_raw_torch"] = row["median_step_s"] / raw[world]["median_step_s"]


def main(base: Config, args) -> None:
    """`gpupar bench`: run the grid, print the report, write bench.json, report.md and the plots."""
    import shlex

    from gpupar.bench.report import _pyplot, markdown, update_markdown, write_outputs
    from gpupar.sweep import parse_list

    _pyplot()  # fail now, not after the runs, when matplotlib is missing
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    spec = BenchSpec(base=base, strategies=comma_list(args.strategies, "--strategies"),
                     world_sizes=parse_list(args.world_sizes, int, "--world-sizes"),
                     steps=args.steps, warmup=args.warmup, out=out,
                     peers=comma_list(args.peers, "--peers") if args.peers else [],
                     peak_tflops=args.peak_tflops, threads_per_rank=args.threads_per_rank,
                     command="gpupar " + shlex.join(args.command_line))
    summary = run_bench(spec)
    files = write_outputs(summary, out)
    print(markdown(summary), end="")
    if args.update_markdown:
        update_markdown(Path(args.update_markdown), args.label, markdown(summary))
    print(f"Wrote {', '.join(str(f) for f in files)}")


def comma_list(text: str, name: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{name} {text!r}: expected a comma-separated list")
    return items

