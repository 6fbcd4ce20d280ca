"""The GPU suite: every GPU figure of issue 15 in one call, written as suite.json and suite.md.

    bash benchmarks/gpu_suite.sh [--device cuda] [--out DIR]     # one H100/H200: at most ~8 minutes
    bash benchmarks/gpu_suite.sh --device cpu --tiny              # CI: the same code at tiny sizes

Parts (each one row in the summary; a part that fails is recorded with its error, never
stops the others):
  tests      the GPU-marked tests (pytest -m gpu); on CPU: skipped
  classic    the classic example, gpupar.train (--cuda-graphs on CUDA) against the plain loop,
             interleaved repeats, min and median; goal <= 0.5 on CUDA
  gpt        the built-in GPT at ~1B parameters, bf16 autocast, SDPA, --compile: tokens/s and
             MFU against the card's dense bf16 peak (goal >= 50%); peak memory against the
             memory report (params + grads + optimizer state)
  sweep      benchmarks/sweep_fusion.py: 64 classic models fused against sequential (goal >= 50x)
  ddp, fsdp  world 1 over NCCL (gloo on CPU): a few steps equal the single-device steps

NOT YET RUN ON A GPU (written for torch 2.11 on CUDA; the CPU --tiny path runs in CI).
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_tests(device, tiny):
    if device.type != "cuda":
        return {"skipped": "no CUDA device: the GPU-marked tests skip themselves"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests")],
                          capture_output=True, text=True, timeout=240)
    return {"returncode": proc.returncode, "tail": proc.stdout.strip().splitlines()[-1:]}


def part_classic(device, tiny):
    import gpupar
    from gpupar.config import Config
    from gpupar.data import synthetic_regression

    overhead = _load("overhead_single")
    X, y = synthetic_regression()
    graphs = device.type == "cuda"

    def ours(X, y, device):
        cfg = Config()
        cfg.train.device, cfg.train.progress, cfg.train.cuda_graphs = str(device), False, graphs
        torch.manual_seed(42)
        return gpupar.train(gpupar.SimpleNN(), (X, y), config=cfg).model

    repeats = 1 if tiny else 11
    for _ in range(0 if tiny else 3):  # warm-up (compiles and records the graphs on CUDA)
        overhead.timed(overhead.plain_loop, X, y, device), overhead.timed(ours, X, y, device)
    plain, mine = [], []
    for _ in range(repeats):
        plain.append(overhead.timed(overhead.plain_loop, X, y, device))
        mine.append(overhead.timed(ours, X, y, device))
    return {"cuda_graphs": graphs, "repeats": repeats, "plain_ms": [min(plain) * 1e3, statistics.median(plain) * 1e3],
            "gpupar_ms": [min(mine) * 1e3, statistics.median(mine) * 1e3],
            "ratio_median": statistics.median(mine) / statistics.median(plain),
            "ratio_min": min(mine) / min(plain), "goal": "<= 0.5 on CUDA, <= 1.00 on CPU"}


def part_gpt(device, tiny):
    from gpupar.bench.flops import gpu_peak_tflops
    from gpupar.bench.worker import StepTimer
    from gpupar.config import Config
    from gpupar.job import load_problem
    from gpupar.loop import as_samples, fit, make_loss, make_optimizer
    from gpupar.memory import memory_report, peak_bytes
    from gpupar.topology import Topology

    cfg = Config()
    m = cfg.model
    cfg.model.name = "gpt"
    if tiny:
        m.hidden, m.layers, m.heads, m.seq_len, m.vocab, batch, steps, warmup = 32, 2, 4, 16, 64, 8, 3, 1
    else:  # 12 L d^2 + 2 V d = 1.01e9 parameters
        m.hidden, m.layers, m.heads, m.seq_len, m.vocab, batch, steps, warmup = 2048, 18, 16, 1024, 32768, 8, 10, 3
    cfg.data.samples, cfg.train.batch_size = batch, batch
    cfg.train.epochs = cfg.train.max_steps = cfg.train.log_every = steps + warmup
    cfg.train.device, cfg.train.progress = str(device), False
    cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.train.compile = device.type == "cuda"  # inductor on a 2-core CPU takes longer than CI allows
    topo = Topology.single(device)
    with torch.device(device):
        problem = load_problem(cfg.validate())  # built on the device: 4 GB of fp32 weights never touch the host
    model = problem.model.to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(topo, warmup, steps - 1)
    train_set, _ = as_samples((problem.X, problem.y), cfg)
    history = fit(model, train_set, cfg, topo, make_loss(cfg, problem.spec), optimizer, log=lambda _: None,
                  on_step=timer)
    step_s = statistics.median(timer.step_seconds())
    tokens = batch * m.seq_len
    # Model FLOPs: 6 N per token (forward and backward of every weight) + causal attention's
    # scores and values, 6 L T d per token for forward and backward (half of the dense 12 L T d).
    flops = 6 * params * tokens + 6 * m.layers * m.seq_len * m.hidden * tokens
    peak = gpu_peak_tflops(torch.cuda.get_device_name(device), "bf16") if device.type == "cuda" else None
    report = memory_report(model, optimizer, history.grad_bytes, device)
    measured, kind = peak_bytes(device)
    return {"params": params, "batch": batch, "seq_len": m.seq_len, "precision": cfg.train.precision,
            "compile": cfg.train.compile, "median_step_s": step_s, "tokens_per_s": tokens / step_s,
            "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
            "mfu": flops / step_s / 1e12 / peak if peak else None, "goal_mfu": 0.5,
            "memory_report_persistent_bytes": report["persistent_bytes"], "peak_bytes": measured, "peak_kind": kind,
            "peak_over_persistent": measured / report["persistent_bytes"], "final_loss": history.final_loss}


def part_sweep(device, tiny):
    """benchmarks/sweep_fusion.py as it stands (its own interleaving, load check and report)."""
    args = ["--device", device.type] + (["--models", "1", "--repeats", "1", "--max-load", "1000"] if tiny else [])
    sweep, out, argv = _load("sweep_fusion"), io.StringIO(), sys.argv
    sys.argv = ["sweep_fusion.py", *args]
    try:
        with contextlib.redirect_stdout(out):
            sweep.main()
    finally:
        sys.argv = argv
    return {"models": 1 if tiny else 64, "output": out.getvalue().strip().splitlines()[-6:], "goal": ">= 50x on a GPU"}


def part_data_parallel(device, tiny):
    """DDP and FSDP wrappers at world 1 (NCCL on CUDA): their steps equal the plain model's."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from gpupar.config import ParallelConfig
    from gpupar.parallel.ddp import apply_ddp
    from gpupar.parallel.fsdp import apply_fsdp
    from gpupar.topology import Topology

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group(backend, rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)

        x, y = torch.randn(32, 16, device=device), torch.randn(32, 1, device=device)

        def train(m):
            opt = torch.optim.Adam(m.parameters(), lr=0.01, fused=True)
            losses = []
            for _ in range(5):
                loss = nn.functional.mse_loss(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            return torch.stack(losses).tolist()

        ref = train(model())
        topo = Topology.single(device)
        rows = {}
        for name, wrap in (("ddp", lambda m: apply_ddp(m, topo, ParallelConfig())),
                           ("fsdp", lambda m: apply_fsdp(m, init_device_mesh(device.type, (1,)), ParallelConfig()))):
            got = train(wrap(model()))
            gap = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
            rows[name] = {"backend": backend, "world": 1, "max_rel_gap": gap, "ok": gap <= 1e-5}
        return rows
    finally:
        dist.destroy_process_group()


def markdown(summary) -> str:
    env = summary["environment"]
    lines = [f"# gpupar GPU suite ({'tiny' if summary['tiny'] else 'full'}), {env['date']}", "",
             f"device {env['device']}, torch {env['torch']}, load average {env['load_average']}, "
             f"{summary['wall_s']:.0f} s", "", "| part | result |", "|---|---|"]
    for name, row in summary["parts"].items():
        lines.append(f"| {name} | {json.dumps(row, default=str)[:400].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CI on CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from gpupar.devices import describe, pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out or f"runs/gpu-suite-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    parts = {}
    for name, fn in (("tests", part_tests), ("classic", part_classic), ("gpt", part_gpt), ("sweep", part_sweep),
                     ("data_parallel", part_data_parallel)):
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                parts[name] = fn(device, args.tiny)
        except Exception as exc:  # recorded, and the suite goes on
            parts[name] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}",
                           "where": traceback.format_exc().strip().splitlines()[-3:]}
        parts[name] = {**parts[name], "seconds": round(time.perf_counter() - start, 2)} \
            if isinstance(parts[name], dict) else parts[name]
        print(f"{name}: {json.dumps(parts[name], default=str)[:300]}", flush=True)
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": describe(device), "torch": torch.__version__,
           "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    summary = {"environment": env, "tiny": args.tiny, "wall_s": time.perf_counter() - began, "parts": parts}
    (out / "suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "suite.md").write_text(markdown(summary))
    print(f"Wrote {out / 'suite.json'} and {out / 'suite.md'}")
    failed = [n for n, r in parts.items() if "error" in r or (n == "tests" and r.get("returncode"))
              or (n == "data_parallel" and not all(v["ok"] for v in r.values() if isinstance(v, dict)))]
    if failed:
        print(f"FAILED parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
