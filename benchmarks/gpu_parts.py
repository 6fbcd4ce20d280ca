"""The parts of the GPU suite (benchmarks/gpu_suite.py runs each in its own process).

Each ``part_*`` takes the device and ``tiny`` and returns one JSON-able dict. They are written
for torch 2.11 on CUDA; ``--device cpu --tiny`` runs the same code at tiny sizes (CI).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_tests(device, tiny):
    """The GPU-marked tests (tests/test_gpu.py). Without CUDA each would skip itself, and the
    CPU suite already collects the file: nothing to run."""
    if device.type != "cuda":
        return {"skipped": "tests/test_gpu.py needs CUDA (the CPU suite collects it and skips each test)"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider",
                           "--timeout", "60", str(REPO / "tests" / "test_gpu.py")],  # a hung test fails alone
                          capture_output=True, text=True, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1:],
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:10],
            "log": proc.stdout[-20000:] + proc.stderr[-4000:]}


def part_cpu_suite(device, tiny):
    """The CPU test suite (gloo ranks, GPU hidden) under this machine's torch: the lent cards run
    torch 2.11, the development machine 2.13. 6 pytest workers, one test file per worker."""
    import os

    if tiny or device.type != "cuda":
        return {"skipped": "runs on the lent GPU machine only (CI runs the suite itself)"}
    absent = [m for m in ("mlflow", "nbclient") if importlib.util.find_spec(m) is None]
    ignore = ["--ignore", str(REPO / "tests" / "test_mlops.py")] if absent else []
    # Each worker's ranks share two threads: 8 workers of 2-4 ranks at torch's default (a thread
    # per core each) drove an H200 host's 16 cores to a load of 80, and the part timed out.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "6", "--dist", "loadfile", "-p",
                           "no:cacheprovider", "-m", "not gpu", *ignore, "--deselect",
                           "tests/test_fast_paths.py::test_gpu_suite_runs_tiny_on_cpu", "tests"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"})
    lines = proc.stdout.strip().splitlines()
    return {"torch": torch.__version__, "returncode": proc.returncode, "summary": lines[-1:],
            "ignored": f"tests/test_mlops.py ({', '.join(absent)} not installed)" if absent else None,
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20],
            "log": proc.stdout[-20000:] + proc.stderr[-4000:]}


def part_classic(device, tiny):
    """The classic example: gpupar.train (eager, and with --cuda-graphs on CUDA) against the
    plain 40-line loop; interleaved repeats, min and median."""
    overhead = _load("overhead_single")
    from gpupar.data import synthetic_regression

    X, y = synthetic_regression()
    sides = {"plain": overhead.plain_loop, "gpupar": overhead.with_gpupar}
    if device.type == "cuda":
        def graphs(X, y, device):
            overhead.FLAGS["cuda_graphs"] = True
            try:
                return overhead.with_gpupar(X, y, device)
            finally:
                overhead.FLAGS["cuda_graphs"] = False
        sides["gpupar_cuda_graphs"] = graphs
    times = {name: [] for name in sides}
    for r in range(1 if tiny else 3 + 11):  # 3 warm-ups: compile, record the graphs
        for name, fn in sides.items():
            t = overhead.timed(fn, X, y, device)
            if tiny or r >= 3:
                times[name].append(t)
    row = {name: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3} for name, t in times.items()}
    if device.type == "cuda":  # where each side's time goes: API calls per run (launches, graph replays, syncs)
        from torch.profiler import ProfilerActivity, profile

        for name, fn in sides.items():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                overhead.timed(fn, X, y, device)
            calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("cuda")}
            row[name]["cuda_api_calls"] = dict(sorted(calls.items(), key=lambda kv: -kv[1])[:6])
    for name in sides:
        if name != "plain":
            row[name]["ratio_median"] = statistics.median(times[name]) / statistics.median(times["plain"])
            row[name]["ratio_min"] = min(times[name]) / min(times["plain"])
    return {**row, "repeats": len(times["plain"]), "goal": "gpupar / plain <= 0.5 on CUDA (graphs), <= 1.00 on CPU"}


def gpt(device, tiny, compile_):
    """The built-in GPT at ~1B parameters, bf16 autocast, SDPA: tokens/s and MFU against the
    card's dense bf16 peak; peak memory against params + grads + Adam state."""
    from gpupar.measure.flops import gpu_peak_tflops
    from gpupar.bench.worker import StepTimer
    from gpupar.config import Config
    from gpupar.problem import load_problem
    from gpupar.data import as_samples
    from gpupar.training.loop import Hooks, fit
    from gpupar.training.recipe import make_loss, make_optimizer
    from gpupar.memory import memory_report, peak_bytes
    from gpupar.models import build_model
    from gpupar.parallelize import compile_in_place
    from gpupar.topology import Topology

    cfg = Config()
    m = cfg.model
    m.name = "gpt"
    if tiny:
        m.hidden, m.layers, m.heads, m.seq_len, m.vocab, batch, steps, warmup = 32, 2, 4, 16, 64, 8, 3, 1
    else:  # 12 L d^2 + 2 V d = 1.04e9 parameters
        m.hidden, m.layers, m.heads, m.seq_len, m.vocab, batch, steps, warmup = 2048, 18, 16, 1024, 32768, 8, 10, 3
    cfg.data.samples, cfg.train.batch_size = batch, batch
    cfg.train.epochs = cfg.train.max_steps = cfg.train.log_every = steps + warmup
    cfg.train.device, cfg.train.progress = str(device), False
    cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.train.compile = compile_
    topo = Topology.single(device)
    problem = load_problem(cfg.validate(), meta=True)  # the data, and the model's shapes only
    with torch.device(device):  # initialised on the device: 4 GB of fp32 weights never touch the host
        model = build_model(cfg.model, 0, 0, cfg.train.seed)
    params = sum(p.numel() for p in model.parameters())
    compile_in_place(model, cfg, whole_step=False)
    optimizer = make_optimizer(model, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(topo, warmup, steps - 1)
    train_set, _ = as_samples((problem.X, problem.y), cfg)
    history = fit(model, train_set, cfg, topo, make_loss(cfg, problem.spec.loss), optimizer,
                  hooks=Hooks(log=lambda _: None, on_step=timer))
    step_s = statistics.median(timer.step_seconds())
    tokens = batch * m.seq_len
    # Model FLOPs: 6 N per token (forward and backward of every weight) + causal attention's
    # scores and values, 6 L T d per token for forward and backward (half of the dense 12 L T d).
    flops = 6 * params * tokens + 6 * m.layers * m.seq_len * m.hidden * tokens
    peak = gpu_peak_tflops(torch.cuda.get_device_name(device), "bf16") if device.type == "cuda" else None
    report = memory_report(model, optimizer, history.grad_bytes, device)
    measured, kind = peak_bytes(device)
    return {"params": params, "batch": batch, "seq_len": m.seq_len, "precision": cfg.train.precision,
            "compile": compile_, "median_step_s": step_s, "tokens_per_s": tokens / step_s,
            "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
            "mfu": flops / step_s / 1e12 / peak if peak else None, "goal_mfu": 0.5,
            "memory_report_persistent_bytes": report["persistent_bytes"], "peak_bytes": measured, "peak_kind": kind,
            "peak_over_persistent": measured / report["persistent_bytes"], "final_loss": history.final_loss}


def part_gpt_eager(device, tiny):
    return gpt(device, tiny, compile_=False)


def part_gpt_compiled(device, tiny):
    # inductor on a 2-core CPU takes longer than CI allows: the tiny CPU run stays eager
    return gpt(device, tiny, compile_=device.type == "cuda")


def part_sweep(device, tiny):
    """benchmarks/sweep_fusion.py as it stands (its own interleaving, load check and report)."""
    args = ["--device", device.type] + (["--models", "1", "--repeats", "1", "--max-load", "1000"] if tiny
                                       else ["--repeats", "3", "--max-load", "1000"])
    sweep, out, argv = _load("sweep_fusion"), io.StringIO(), sys.argv
    sys.argv = ["sweep_fusion.py", *args]
    try:
        with contextlib.redirect_stdout(out):
            sweep.main()
    finally:
        sys.argv = argv
    return {"models": 1 if tiny else 64, "output": out.getvalue().strip().splitlines()[-6:], "goal": ">= 50x on a GPU"}


PLAN_MODELS = {  # global batch 16 at world 1 on one card; tiny: the CPU path of the same code
    "mlp": (["--model", "mlp", "--hidden", "4096", "--layers", "8", "--features", "1024", "--samples", "4096",
             "--batch-size", "1024"], ["--model", "mlp", "--hidden", "32", "--layers", "4", "--batch-size", "32"]),
    "gpt": (["--model", "gpt", "--hidden", "1024", "--layers", "8", "--heads", "16", "--seq-len", "512",
             "--vocab", "8192", "--samples", "64", "--batch-size", "16"],
            ["--model", "gpt", "--hidden", "32", "--layers", "2", "--samples", "32", "--batch-size", "16"]),
}


def part_plan(device, tiny):
    """`gpupar plan` at world 1 against the card: its persistent bytes, transient and peak
    for each model with and without activation checkpointing, against
    ``torch.cuda.max_memory_allocated`` during the third step (the same step and the same
    definitions as benchmarks/plan_accuracy.py, whose CPU grid covers worlds 1, 2 and 4)."""
    rows = []
    for name, (full, small) in PLAN_MODELS.items():
        flags = small if tiny else full
        proc = subprocess.run([sys.executable, "-m", "gpupar", "plan", *flags, "--device", device.type,
                               "--world-sizes", "1", "--json"], capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            rows.append({"model": name, "error": proc.stderr.strip()[-300:]})
            continue
        for planned in json.loads(proc.stdout)["rows"]:
            if planned["layout"] != "single" or planned["cpu_offload"]:
                continue
            ac = planned["activation_checkpointing"]
            got = measure_single(device, flags + ["--activation-checkpointing", ac])
            want = planned["per_rank"][0]
            row = {"model": name, "ac": ac, "pred_persistent": want["params"] + want["grads"] + want["optimizer"],
                   "pred_transient": want["transient"], "pred_peak": want["peak"], "pred_step_s": planned["step_s"],
                   **got}
            if got.get("peak"):
                row["peak_gap"] = want["peak"] / got["peak"] - 1
                row["transient_gap"] = want["transient"] / got["transient"] - 1
            rows.append(row)
    return {"rows": rows, "goal": "persistent exact; transient and peak within 10%"}


def one_rank(device, flags):
    """``gpupar train FLAGS`` as one rank on ``device``, built as the loop builds it: the
    parallelised model, its optimizer, and ``step()``, one training step on the first batch."""
    from gpupar.cli import build_parser
    from gpupar.flags import config_from_args
    from gpupar.problem import load_problem
    from gpupar.training.recipe import autocast_for, make_loss, make_optimizer
    from gpupar.parallelize import parallelize
    from gpupar.topology import Topology

    cfg = config_from_args(build_parser().parse_args(["train", *flags, "--device", device.type]))
    problem = load_problem(cfg)
    parallel = parallelize(problem.model.to(device), Topology.single(device), cfg, problem.spec)
    del problem.model  # the parallelised model is the one that trains
    optimizer, loss_fn = make_optimizer(parallel.model, cfg), make_loss(cfg, problem.spec.loss)
    rows = cfg.train.batch_size
    batch = [(problem.X[:rows].to(device), problem.y[:rows].to(device))]

    def step(between=lambda: None) -> None:  # ``between`` runs after backward, before the optimizer
        parallel.step(batch, loss_fn, autocast_for(device, cfg.train.precision), None)
        between()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return parallel.model, optimizer, batch, step


def measure_single(device, flags) -> dict:
    """One rank on ``device``: persistent bytes and the third step's transient and peak."""
    from gpupar.memory import grad_bytes, memory_report

    model, optimizer, _, step = one_rank(device, flags)
    cuda = device.type == "cuda"
    out = {}
    grads: list[int] = []
    for k in range(3):
        if k == 2 and cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            at_start = torch.cuda.memory_allocated(device)
        if k == 0:
            step(lambda: grads.append(grad_bytes(model)))
        else:
            step()
    report = memory_report(model, optimizer, grads[0], device)
    out["persistent"] = report["persistent_bytes"]
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak=peak, transient=peak - at_start)
    return out


def part_ac_diag(device, tiny):
    """Checkpointed runs on an H200 started each step with one extra copy of the checkpointed
    blocks' parameters allocated: what holds it, and whether Python's collector frees it."""
    import gc

    flags = PLAN_MODELS["mlp"][1 if tiny else 0]
    rows = {}
    for ac in ("none", "full"):
        model, optimizer, batch, step = one_rank(device, [*flags, "--activation-checkpointing", ac])
        allocated = (lambda: torch.cuda.memory_allocated(device)) if device.type == "cuda" else (lambda: 0)
        gc.collect()
        gc.disable()
        try:
            for _ in range(2):
                step()
            known = {id(t) for t in model.parameters()} | {id(t) for b in batch for t in b}
            known |= {id(v) for st in optimizer.state.values() for v in st.values()}
            strays = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device == device
                      and id(o) not in known]
            seen = [{"shape": list(t.shape), "requires_grad": t.requires_grad, "leaf": t.is_leaf,
                     "grad_fn": type(t.grad_fn).__name__ if t.grad_fn is not None else None,
                     "referrers": sorted({type(r).__name__ for r in gc.get_referrers(t)})[:6]} for t in strays[:8]]
            before = allocated()
            collected = gc.collect()
            rows[ac] = {"allocated_after_step": before, "after_gc_collect": allocated(), "collected": collected,
                        "grads_none": all(p.grad is None for p in model.parameters()),
                        "python_tensors_not_params_or_state": len(strays), "first": seen}
        finally:
            gc.enable()
        del model, optimizer, batch, step
        gc.collect()
    return rows
