"""How accurate is `gpupar plan`? Predicted against measured, per rank, on CPU/gloo.

The grid: the MLP and the GPT at two sizes each; world sizes 1, 2 and 4; single, ddp,
fsdp, tp and pp (1F1B at world 2, GPipe at world 4); activation checkpointing none and
full. Layouts the launcher's checks refuse are listed with their reason and not run.

Measured, in real ranks (one torchrun start per world size; each rank runs every layout
of its world in turn on fresh meshes):
- persistent bytes: ``memory.memory_report``'s parameters, gradients (after the first
  backward) and optimizer state, local shards, per rank; compared for exact equality;
- memory, by an independent method: ``torch.profiler`` memory events on the CPU. The
  profiler runs from before the model is built to the end of the third step; the running
  sum of allocation and free events is what the rank has allocated since. The peak during
  the third step, less the data set's bytes, is the measured peak; the peak less the
  amount at the step's start is the step's transient (activations, gradients, gathered
  parameters, optimizer temporaries). Both are compared within 10%;
- step time: the median of 5 timed steps after 3 warm-up steps, the slowest rank's.
  Spearman's rank correlation of predicted and measured step times, over all runs.

    python benchmarks/plan_accuracy.py [--update-markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"mlp-s": {"name": "mlp", "hidden": 64, "layers": 4}, "mlp-m": {"name": "mlp", "hidden": 256, "layers": 4},
          "gpt-s": {"name": "gpt", "hidden": 32, "layers": 2}, "gpt-m": {"name": "gpt", "hidden": 64, "layers": 4}}
LAYOUTS = {1: [("single", {})], 2: [("ddp", {"strategy": "ddp"}), ("fsdp", {"strategy": "fsdp"}),
                                    ("tp", {"strategy": "tp"}), ("pp", {"strategy": "pp", "schedule": "1f1b"})],
           4: [("ddp", {"strategy": "ddp"}), ("fsdp", {"strategy": "fsdp"}), ("tp", {"strategy": "tp"}),
               ("pp", {"strategy": "pp", "schedule": "gpipe"})]}
BATCH = 32


def config(model: str, world: int, flags: dict, ac: str):
    from gpupar.config import Config

    cfg = Config()
    for k, v in MODELS[model].items():
        setattr(cfg.model, k, v)
    cfg.data.samples, cfg.train.batch_size, cfg.train.progress = 64, BATCH, False
    for k, v in flags.items():
        setattr(cfg.parallel, k, v)
    cfg.parallel.activation_checkpointing = ac
    if world > 1:
        cfg.parallel.nproc_per_node = world
    return cfg.validate()


def grid(world: int):
    for model in MODELS:
        for name, flags in LAYOUTS[world]:
            for ac in ("none", "full"):
                yield model, name, flags, ac


def step_peak(prof, start_ns: int) -> tuple[int, int]:
    """(bytes allocated at ``start_ns``, most allocated after it), from the memory events."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    running, at_start, peak = 0, None, 0
    for t, n in events:
        if t >= start_ns and at_start is None:
            at_start = running
        running += n
        if t >= start_ns:
            peak = max(peak, running)
    return at_start or running, peak


def measure(model, name, flags, ac, world, rank) -> dict:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from gpupar.config import layout
    from gpupar.data import shard_batch
    from gpupar.job import load_problem, preflight
    from gpupar.loop import make_loss, make_optimizer
    from gpupar.memory import grad_bytes, memory_report
    from gpupar.parallelize import parallelize
    from gpupar.topology import ParallelDims, Topology

    cfg = config(model, world, flags, ac)
    try:
        preflight(cfg, world, world)
    except Exception as exc:  # UsageError: the layout cannot run
        return {"skipped": str(exc)}
    dims = ParallelDims.resolve(layout(cfg.parallel), world, world) if world > 1 else ParallelDims()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        problem = load_problem(cfg)
        data_bytes = problem.X.nbytes + problem.y.nbytes
        topo = Topology(torch.device("cpu"), rank, rank, world, dims, dims.build_mesh("cpu")) if world > 1 \
            else Topology.single(torch.device("cpu"))
        parallel = parallelize(problem.model, topo, cfg, problem.spec)
        del problem.model
        optimizer = make_optimizer(parallel.model, cfg)
        loss_fn = make_loss(cfg, problem.spec)
        rows = shard_batch(torch.arange(BATCH), topo.dp, topo.dp_rank)
        batch = [(problem.X[rows], problem.y[rows])]
        grads, times, start_ns = 0, [], 0

        def one_step(step: int) -> None:
            nonlocal grads
            if world > 1:
                dist.barrier()
            began = time.perf_counter()
            parallel.step(batch, loss_fn, contextlib.nullcontext(), None)
            if step == 0:
                grads = grad_bytes(parallel.model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)

        one_step(0)
        one_step(1)
        start_ns = time.time_ns()
        one_step(2)  # the profiled step: optimizer state exists, gradients start at None
    for step in range(3, 8):
        one_step(step)
    at_start, peak = step_peak(prof, start_ns)
    report = memory_report(parallel.model, optimizer, grads, topo.device)
    if topo.mesh is not None:
        dist.barrier()
    return {"param_bytes": report["param_bytes"], "grad_bytes": report["grad_bytes"],
            "optim_bytes": report["optim_bytes"], "peak": peak - data_bytes, "transient": peak - at_start,
            "step_s": statistics.median(times[3:])}


def worker(out: str) -> None:
    import torch.distributed as dist

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world > 1:
        dist.init_process_group("gloo")
    results = []
    for model, name, flags, ac in grid(world):
        mine = measure(model, name, flags, ac, world, rank)
        everyone = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        results.append({"model": model, "layout": name, "ac": ac, "world": world, "ranks": everyone})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if world > 1:
        dist.barrier()
    # As gpupar's ranks do: finalizing torch's C++ threads can abort a finished process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def predict(entry: dict, machine) -> dict:
    from gpupar.config import layout
    from gpupar.plan import Row
    from gpupar.plan_memory import Context, predict as predict_row
    from gpupar.topology import ParallelDims

    world = entry["world"]
    cfg = config(entry["model"], world, dict(LAYOUTS[world])[entry["layout"]], entry["ac"])
    dims = ParallelDims.resolve(layout(cfg.parallel), world, world) if world > 1 else ParallelDims()
    row = Row(entry["layout"], world, entry["ac"], False, "")
    predict_row(Context.build(cfg), cfg, dims, row, "cpu", machine)
    return {"per_rank": row.per_rank, "step_s": row.step_s}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--update-markdown", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    from gpupar.plan_probe import measure_machine

    machine = measure_machine("cpu", "fp32", args.worlds)
    root = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    entries = []
    for world in args.worlds:
        out = root / f"w{world}.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                        __file__, "--worker", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        entries += json.loads(out.read_text())
    lines, pred_t, meas_t, exact, mem_ok, fits_ok, n_mem = [], [], [], 0, 0, True, 0
    for e in entries:
        if "skipped" in e["ranks"][0]:
            lines.append(f"| {e['model']} | {e['world']} | {e['layout']} | {e['ac']} | cannot run: "
                         f"{e['ranks'][0]['skipped'][:70]} | | | | |")
            continue
        p = predict(e, machine)
        same = all((r["param_bytes"], r["grad_bytes"], r["optim_bytes"]) == (q["params"], q["grads"], q["optimizer"])
                   for r, q in zip(e["ranks"], p["per_rank"]))
        exact += same
        worst = max(range(len(e["ranks"])), key=lambda i: e["ranks"][i]["peak"])
        m, q = e["ranks"][worst], p["per_rank"][worst]
        peak_err = q["peak"] / m["peak"] - 1
        trans_err = q["transient"] / m["transient"] - 1
        n_mem += 1
        mem_ok += abs(peak_err) <= 0.10 and abs(trans_err) <= 0.10
        fits_ok &= m["peak"] <= 1.10 * q["peak"]
        step = max(r["step_s"] for r in e["ranks"])
        pred_t.append(p["step_s"])
        meas_t.append(step)
        lines.append(f"| {e['model']} | {e['world']} | {e['layout']} | {e['ac']} | {'yes' if same else 'NO'} | "
                     f"{q['transient'] / 1024:.0f} / {m['transient'] / 1024:.0f} ({trans_err:+.0%}) | "
                     f"{q['peak'] / 1024:.0f} / {m['peak'] / 1024:.0f} ({peak_err:+.0%}) | "
                     f"{p['step_s'] * 1e3:.2f} | {step * 1e3:.2f} |")
    rho = spearman(pred_t, meas_t)
    load = os.getloadavg()[0]
    report = "\n".join([
        f"Runs: {len(pred_t)} (of {len(entries)}); persistent bytes exact on every rank: {exact}/{len(pred_t)}; "
        f"transient and peak within 10%: {mem_ok}/{n_mem}; no run above its predicted peak by > 10%: "
        f"{'yes' if fits_ok else 'NO'}; Spearman of step times: {rho:.2f} (under load: load average {load:.1f})",
        "",
        "| model | W | layout | AC | persistent exact | transient KiB pred / meas | peak KiB pred / meas "
        "| step ms pred | step ms meas (under load) |",
        "|---|---|---|---|---|---|---|---|---|", *lines])
    print(report)
    plot = Path(args.update_markdown).parent / "benchmarks" / "plan_accuracy.png" if args.update_markdown else None
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ax.loglog([t * 1e3 for t in pred_t], [t * 1e3 for t in meas_t], "o")
        lo, hi = min(pred_t + meas_t) * 1e3, max(pred_t + meas_t) * 1e3
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("predicted step time (ms)")
        ax.set_ylabel("measured step time (ms, under load)")
        ax.set_title(f"gpupar plan, CPU/gloo: Spearman {rho:.2f}")
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
        md = Path(args.update_markdown)
        text = md.read_text()
        begin, end = "<!-- gpupar plan-accuracy -->", "<!-- end gpupar plan-accuracy -->"
        block = f"{begin}\n{report}\n\n![plan accuracy](benchmarks/plan_accuracy.png)\n{end}"
        if begin in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text += "\n" + block + "\n"
        md.write_text(text)


if __name__ == "__main__":
    main()
