"""`gpupar bench`: the same training workload timed across strategies and world sizes.

"Which strategy should I use, and what did I gain?" Each (strategy, world size) pair trains
the same model on the same global batch in fresh processes, through gpupar's own training
loop (``loop.fit``), and reports the median step time, samples/s (tokens/s for gpt),
per-rank peak memory, the model FLOP/s and MFU, and the scaling efficiency against world 1.
A pair that fails or is not supported is reported as skipped, with the reason; it never
stops the run.

Timing. A warm-up step or more first (allocator, kernels, DDP's first bucket rebuild). On a
GPU each step's end is a CUDA event, read after one synchronisation at the end, so timing
adds no host sync per step; the timed window opens and closes with a barrier after a
device sync, so every rank's clock covers the same work. The slowest rank sets each step's
time (max over ranks), and the median over steps resists outliers.

FLOPs. ``torch.utils.flop_counter.FlopCounterMode`` counts one forward and backward of the
whole global batch on the unwrapped model (on the meta device when it can, so nothing is
computed). These are the model FLOPs of MFU as Chowdhery et al. define it (PaLM, 2022,
appendix B): work the model needs, not what a strategy adds (recomputation, communication).
For Linear layers that is ~6 x weights x samples (Kaplan et al., 2020): 2 for forward, 4 for
the two backward matmuls. The peak is the device's dense peak for the run's precision, from
the table below, times the number of GPUs. On CPU every rank runs a short matmul probe with
its own threads just before training, all ranks at once, and the peak is their sum: what
this combination's cores can do at that moment (a shared, busy machine under-reads a peak
measured once beforehand, and MFU would pass 100%).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from gpupar.config import Config, load_toml, to_toml
from gpupar.errors import TrainingError, UsageError

STRATEGIES = ("single", "ddp", "fsdp", "tp", "pp")

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets:
# (name fragment, bf16/fp16 tensor cores, fp32 without TF32). The first fragment that
# appears in the device name wins, so the more specific names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # SXM / HBM3
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),  # fp16 only; no bf16 tensor cores
    ("T4", 65.0, 8.1),
)


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


# --- the training config of one combination --------------------------------------------------

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


def check_runnable(strategy: str, world: int, device: torch.device) -> None:
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise UsageError(f"needs {world} GPUs, {torch.cuda.device_count()} visible")


# --- FLOPs and peaks --------------------------------------------------------------------------

def count_step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> int:
    """FLOPs of one forward and backward of ``model`` on the batch ``x`` (optimizer excluded).

    Runs on the meta device when the model allows it (shapes only, no arithmetic); falls
    back to a real step on a copy of the model.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def count(m, xs, ys) -> int:
        with FlopCounterMode(display=False) as counter:
            loss_fn(m(xs), ys).backward()
        return int(counter.get_total_flops())

    try:
        return count(copy.deepcopy(model).to("meta"), x.to("meta"), y.to("meta"))
    except Exception:  # a user model doing data-dependent Python on values
        return count(copy.deepcopy(model), x, y)


def gpu_peak_tflops(name: str, precision: str) -> float | None:
    for fragment, half, fp32 in GPU_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            return half if precision in ("bf16", "fp16") else fp32
    return None


def cpu_matmul_probe(precision: str, seconds: float = 0.5, n: int = 1024) -> float:
    """Best observed TFLOP/s of an n x n matmul with all of this process's threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    a @ b  # warm-up
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best / 1e12


# --- inside each rank ---------------------------------------------------------------------------

class StepTimer:
    """``fit``'s per-step hook: marks the end of the warm-up and of every timed step."""

    def __init__(self, topo, warmup: int, steps: int):
        self.topo, self.warmup, self.last = topo, warmup, warmup + steps
        self.cuda = topo.device.type == "cuda"
        self.marks: list[tuple[float, object]] = []  # (perf_counter, CUDA event or None)
        self.window_s = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.topo.device)
        if self.topo.distributed:
            dist.barrier()  # every rank opens and closes the window together

    def __call__(self, step: int) -> None:
        if not self.warmup <= step <= self.last:
            return
        if step == self.warmup:
            self._sync()
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((time.perf_counter(), event))
        if step == self.last:
            self._sync()
            self.window_s = time.perf_counter() - self.marks[0][0]

    def step_seconds(self) -> list[float]:
        if self.cuda:
            return [a[1].elapsed_time(b[1]) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """This process's peak memory: allocated tensors on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak CUDA memory allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kib * 1024, "peak process RSS"


def gather_result(topo, timer: StepTimer, probe_tflops: float | None) -> dict:
    """Every rank's step times and memory; the slowest rank sets each step's time."""
    mine = {"step_s": timer.step_seconds(), "window_s": timer.window_s, "threads": torch.get_num_threads(),
            "memory": peak_memory_bytes(topo.device), "probe": probe_tflops}
    everyone = [mine]
    if topo.distributed:
        everyone = [None] * topo.world_size
        dist.all_gather_object(everyone, mine)
    per_step = [max(r["step_s"][i] for r in everyone) for i in range(len(mine["step_s"]))]
    return {"step_s": per_step, "median_step_s": statistics.median(per_step),
            "window_s": max(r["window_s"] for r in everyone),
            "memory_per_rank_bytes": [r["memory"][0] for r in everyone], "memory_kind": mine["memory"][1],
            "threads_per_rank": mine["threads"], "device": str(topo.device),
            "cpu_probe_tflops": sum(r["probe"] for r in everyone) if probe_tflops is not None else None}


def bench_worker(config_path: str, result_path: str, steps: int, warmup: int, peer: str | None = None) -> None:
    """One rank of one combination: train through gpupar's loop (or a peer's), write the result.

    A failure is written to RESULT.rankN.err (one line) before it propagates, so the
    bench can name the reason in its table.
    """
    from gpupar.devices import pick_device
    from gpupar.topology import Topology, launched_by_torchrun

    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_toml(config_path)
        topo = Topology.from_env(cfg) if launched_by_torchrun() else Topology.single(pick_device(cfg.train.device))
        if topo.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(topo.device)
        probe = None
        if topo.device.type == "cpu":
            if topo.distributed:
                dist.barrier()  # all ranks probe at once: they share the machine's cores
            probe = cpu_matmul_probe(cfg.train.precision, seconds=0.3)
        timer = StepTimer(topo, warmup, steps)
        if peer is None:
            _train_gpupar(cfg, topo, timer)
        else:
            from gpupar.bench_peers import train_peer

            train_peer(peer, cfg, topo, timer)
        result = gather_result(topo, timer, probe)
        if topo.is_main:
            Path(result_path).write_text(json.dumps(result))
        topo.close()
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        Path(f"{result_path}.rank{rank}.err").write_text(f"{type(exc).__name__}: {first}"[:300])
        raise


def _train_gpupar(cfg: Config, topo, timer: StepTimer) -> None:
    from gpupar.loop import as_samples, fit, make_loss, make_optimizer
    from gpupar.parallelize import parallelize
    from gpupar.run import load_problem

    problem = load_problem(cfg)
    train_set, _ = as_samples((problem.X, problem.y), cfg)
    model = parallelize(problem.model, topo, cfg)
    fit(model, train_set, cfg, topo, make_loss(cfg), make_optimizer(model, cfg), log=lambda _: None, on_step=timer)


# --- the driver ---------------------------------------------------------------------------------

def run_combination(cfg: Config, out_dir: Path, steps: int, warmup: int, peer: str | None = None,
                    threads: int | None = None) -> dict:
    """Run one combination in fresh processes; its result dict, or {"skipped": reason}."""
    from gpupar.launch import run_workers

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(to_toml(cfg))
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
                run_workers(cfg, argv)
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
    from gpupar.loop import make_loss
    from gpupar.run import load_problem

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
    flops = count_step_flops(problem.model, problem.X[:batch], problem.y[:batch], make_loss(base))
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
    seq_len = base.model.seq_len if base.model.name == "gpt" else None
    rows = []
    for strategy in spec.strategies:
        for world in spec.world_sizes:
            row = {"strategy": strategy, "world_size": world}
            try:
                cfg = strategy_config(base, strategy, world, spec.steps, spec.warmup)
                check_runnable(strategy, world, device)
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
                check_runnable("ddp", world, device)
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
    from gpupar.bench_peers import PEERS, missing_reason

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
