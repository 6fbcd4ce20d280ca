"""How accurate is `gpupar plan`? Predicted against measured, per rank, on CPU/gloo.

The grid: the MLP and the GPT at two sizes each; world sizes 1, 2 and 4; single, ddp,
fsdp, tp and pp (1F1B at world 2, GPipe at world 4); activation checkpointing none and
full. Layouts the launcher's checks refuse are listed with their reason and not run.

Measured, in real ranks (one torchrun start per world size; each rank runs every layout
of its world in turn on fresh meshes):
- persistent bytes: ``memory.memory_report``'s parameters, gradients (after the first
  backward) and optimizer state, local shards, per rank; compared for exact equality;
- memory, by an independent method: ``torch.profiler`` memory events on the CPU. The
  profiler runs from before the model is built to the end of the ninth step; each event
  carries the CPU allocator's process-wide total (c10's ``caffe2_report_cpu_memory_usage``
  flag on, so that frees on gloo's worker threads count: the profiler records events only
  on the threads it profiles, and a running sum of them drifts up by every tensor a gloo
  work object frees), less the total when it started. Steps 3 to 9 are profiled (the
  optimizer state exists). Ranks the plan predicts alike (all ranks of ddp, fsdp or tp;
  one pipeline stage's) are one quantity, and their steps are pooled: the measured peak is
  the median of their peaks (less the data set's bytes), the measured transient that peak
  less the least any of them started with (activations, gradients, gathered parameters,
  optimizer temporaries); the group with the largest peak is reported. Both are compared
  within 10%. The median and the least, because a gloo work object holds its tensors until the
  worker thread that ran it lets go, and on 2 cores shared by 4 ranks that thread is now
  and then descheduled for a while: a tensor the rank has dropped (a DTensor all-reduce's
  output, 32 KiB on an mlp-m tp(4) rank) is then freed later in the step, raising its
  peak, or after the next step began, raising that step's start (820 KiB, an FSDP unit's
  all-gather output, on a gpt-m fsdp(4) rank in about 1 step of 10). The summary also counts
  the runs where any profiled step of any rank went above its predicted peak by more than
  10%;
- step time: the median of 5 timed steps after the profiled ones, the slowest rank's; each
  rank uses cores / ranks threads, as gpupar's ranks do.
  Spearman's rank correlation of predicted and measured step times, over all runs.

    python benchmarks/plan_accuracy.py [--worlds 1 2 4] [--models gpt-s ...] [--layouts tp ...]
                                       [--ac none full] [--update-markdown BENCHMARKS.md]
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
PROFILED = 7  # steps profiled for memory


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


def grid(world: int, models=None, layouts=None, acs=None):
    for model in models or MODELS:
        for name, flags in LAYOUTS[world]:
            for ac in acs or ("none", "full"):
                if layouts is None or name in layouts:
                    yield model, name, flags, ac


def count_all_threads(on: bool) -> None:
    """Make the CPU allocator's running total count every thread's frees.

    The profiler's memory events are recorded per thread, and only on threads it profiles:
    gloo frees the tensors its work objects hold on its own worker threads, so a running sum
    of the events drifts upward by every such tensor (256-512 KiB a step on a tp(2) GPT). With
    c10's ``caffe2_report_cpu_memory_usage`` flag on, the allocator keeps its size table on
    every thread, and each event it reports carries the true process-wide total."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = on


def step_peaks(prof, bounds: list[int]) -> list[tuple[int, int]]:
    """For each step between consecutive ``bounds`` (ns): (bytes allocated at its start, most
    allocated during it), since the profiler started.

    Each CPU allocation event carries the allocator's process-wide total (see
    ``count_all_threads``), frees on gloo's threads included. Counted from the total before
    the first event; a free of a block the window did not allocate (one from before it) is
    added back, so that only what this run allocated counts."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = sorted((n.start_time_ns, n.extra_fields.total_allocated, n.extra_fields.alloc_size, n.extra_fields.ptr)
                    for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu")
    base = events[0][1] - events[0][2] if events else 0
    mine, older, now = set(), 0, 0
    steps = [[None, 0] for _ in bounds[:-1]]
    for t, total, size, ptr in events:
        step = sum(t >= b for b in bounds) - 1  # -1 before the first bound, len(steps) after the last
        if 0 <= step < len(steps) and steps[step][0] is None:
            steps[step][0] = now  # what was allocated when the step began
        if size > 0:
            mine.add(ptr)
        elif ptr in mine:
            mine.discard(ptr)
        else:
            older -= size
        now = total - base + older
        if 0 <= step < len(steps):
            steps[step][1] = max(steps[step][1], now)
    return [(start if start is not None else now, max(peak, start or 0)) for start, peak in steps]


def measure(model, name, flags, ac, world, rank) -> dict:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from gpupar.data import shard_batch
    from gpupar.job import preflight
    from gpupar.problem import load_problem
    from gpupar.training.recipe import make_loss, make_optimizer
    from gpupar.memory import grad_bytes, memory_report
    from gpupar.parallelize import parallelize
    from gpupar.topology import ParallelDims, Topology

    cfg = config(model, world, flags, ac)
    try:
        preflight(cfg, world, world)
    except Exception as exc:  # UsageError: the layout cannot run
        return {"skipped": str(exc)}
    dims = ParallelDims.of(cfg, world, world)
    count_all_threads(True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        problem = load_problem(cfg)
        data_bytes = problem.X.nbytes + problem.y.nbytes
        topo = Topology(torch.device("cpu"), rank, rank, world, dims, dims.build_mesh("cpu")) if world > 1 \
            else Topology.single(torch.device("cpu"))
        parallel = parallelize(problem.model, topo, cfg, problem.spec)
        del problem.model
        optimizer = make_optimizer(parallel.model, cfg)
        loss_fn = make_loss(cfg, problem.spec.loss)
        rows = shard_batch(torch.arange(BATCH), topo.dp, topo.dp_rank)
        batch = [(problem.X[rows], problem.y[rows])]
        grads, times = 0, []

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
        bounds = []
        for step in range(2, 2 + PROFILED):  # optimizer state exists, gradients start at None
            bounds.append(time.time_ns())
            one_step(step)
        if world > 1:
            dist.barrier()
        bounds.append(time.time_ns())
    count_all_threads(False)
    for step in range(2 + PROFILED, 7 + PROFILED):
        one_step(step)
    profiled = step_peaks(prof, bounds)  # summarised in main(), over the ranks predicted alike
    report = memory_report(parallel.model, optimizer, grads, topo.device)
    if topo.mesh is not None:
        dist.barrier()
    return {"param_bytes": report["param_bytes"], "grad_bytes": report["grad_bytes"],
            "optim_bytes": report["optim_bytes"], "starts": [s - data_bytes for s, _ in profiled],
            "peaks": [p - data_bytes for _, p in profiled], "step_s": statistics.median(times[2 + PROFILED:])}


def summarise(ranks: list[dict], predicted: list[dict]) -> tuple[dict, dict]:
    """(measured, predicted) peak and transient of the group of ranks the plan predicts alike
    (every rank of ddp, fsdp or tp; one pipeline stage's) with the largest measured peak.

    Measured peak: the median of the group's profiled steps' peaks; transient: that peak less
    the least any of those steps started with. The median and the least, and the steps of
    every rank that is the same quantity pooled, because gloo frees late (see the module
    docstring): a late free raises a step's peak or the next step's start, never lowers them."""
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(predicted):
        groups.setdefault((q["peak"], q["transient"]), []).append(i)
    summaries = []
    for members in groups.values():
        peak = statistics.median_low([p for i in members for p in ranks[i]["peaks"]])
        base = min(s for i in members for s in ranks[i]["starts"])
        summaries.append(({"peak": peak, "transient": peak - base}, predicted[members[0]]))
    return max(summaries, key=lambda mq: mq[0]["peak"])


def worker(out: str, models, layouts, acs) -> None:
    import torch.distributed as dist

    import torch

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    # gpupar's own policy (topology.Topology.from_env): the ranks share the cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo")
    results = []
    for model, name, flags, ac in grid(world, models, layouts, acs):
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
    from gpupar.plan import Row
    from gpupar.plan.memory import Context, predict_memory as predict_row
    from gpupar.topology import ParallelDims

    world = entry["world"]
    cfg = config(entry["model"], world, dict(LAYOUTS[world])[entry["layout"]], entry["ac"])
    dims = ParallelDims.of(cfg, world, world)
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
    if n < 2:
        return float("nan")  # one run has no order
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="a subset of the grid's models")
    ap.add_argument("--layouts", nargs="+", default=None, help="a subset of single, ddp, fsdp, tp, pp")
    ap.add_argument("--ac", nargs="+", choices=["none", "full"], default=None, help="a subset of checkpointing modes")
    ap.add_argument("--update-markdown", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.models, args.layouts, args.ac)
    from gpupar.plan.probe import measure_machine

    machine = measure_machine("cpu", "fp32", args.worlds)
    root = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    entries = []
    subset = [*(["--models", *args.models] if args.models else []), *(["--layouts", *args.layouts] if args.layouts else []),
              *(["--ac", *args.ac] if args.ac else [])]
    for world in args.worlds:
        out = root / f"w{world}.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                        __file__, "--worker", str(out), *subset], check=True)
        entries += json.loads(out.read_text())
    lines, pred_t, meas_t, exact, mem_ok, fits_ok, n_mem, any_step_over, above_total = [], [], [], 0, 0, True, 0, 0, 0
    for e in entries:
        if "skipped" in e["ranks"][0]:
            lines.append(f"| {e['model']} | {e['world']} | {e['layout']} | {e['ac']} | cannot run: "
                         f"{e['ranks'][0]['skipped'][:70]} | | | | | |")
            continue
        p = predict(e, machine)
        same = all((r["param_bytes"], r["grad_bytes"], r["optim_bytes"]) == (q["params"], q["grads"], q["optimizer"])
                   for r, q in zip(e["ranks"], p["per_rank"]))
        exact += same
        m, q = summarise(e["ranks"], p["per_rank"])
        peak_err = q["peak"] / m["peak"] - 1
        trans_err = q["transient"] / m["transient"] - 1
        n_mem += 1
        mem_ok += abs(peak_err) <= 0.10 and abs(trans_err) <= 0.10
        fits_ok &= m["peak"] <= 1.10 * q["peak"]
        step_over = max(max(r["peaks"]) / pr["peak"] - 1 for r, pr in zip(e["ranks"], p["per_rank"]))
        any_step_over += step_over > 0.10
        # What the plan's "fits" uses: the peak plus the runtime allowance (no margin on top)
        over_total = any(max(r["peaks"]) > pr["peak"] + pr["runtime"] for r, pr in zip(e["ranks"], p["per_rank"]))
        above_total += over_total
        step = max(r["step_s"] for r in e["ranks"])
        pred_t.append(p["step_s"])
        meas_t.append(step)
        lines.append(f"| {e['model']} | {e['world']} | {e['layout']} | {e['ac']} | {'yes' if same else 'NO'} | "
                     f"{q['transient'] / 1024:.0f} / {m['transient'] / 1024:.0f} ({trans_err:+.0%}) | "
                     f"{q['peak'] / 1024:.0f} / {m['peak'] / 1024:.0f} ({peak_err:+.0%}) | "
                     f"{step_over:+.0%}{' (above the total)' if over_total else ''} | "
                     f"{p['step_s'] * 1e3:.2f} | {step * 1e3:.2f} |")
    rho = spearman(pred_t, meas_t)
    load = os.getloadavg()[0]
    report = "\n".join([
        f"Runs: {len(pred_t)} (of {len(entries)}); persistent bytes exact on every rank: {exact}/{len(pred_t)}; "
        f"transient and peak within 10%: {mem_ok}/{n_mem}; no run above its predicted peak by > 10%: "
        f"{'yes' if fits_ok else 'NO'} (in any one of the {PROFILED} profiled steps of a run, on any rank: "
        f"{any_step_over} runs above; above the plan's total, peak + runtime allowance: {above_total}); "
        f"Spearman of step times: {rho:.2f} (under load: load average {load:.1f})",
        "",
        "| model | W | layout | AC | persistent exact | transient KiB pred / meas | peak KiB pred / meas "
        "| highest step above pred | step ms pred | step ms meas (under load) |",
        "|---|---|---|---|---|---|---|---|---|---|", *lines])
    print(report)
    if args.update_markdown:
        update_markdown(Path(args.update_markdown), report, pred_t, meas_t, rho)


def update_markdown(md: Path, report: str, pred_t: list[float], meas_t: list[float], rho: float) -> None:
    """The report and a predicted-against-measured plot (benchmarks/plan_accuracy.png) into
    ``md`` between its plan-accuracy markers (appended the first time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = md.parent / "benchmarks" / "plan_accuracy.png"
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog([t * 1e3 for t in pred_t], [t * 1e3 for t in meas_t], "o")
    lo, hi = min(pred_t + meas_t) * 1e3, max(pred_t + meas_t) * 1e3
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("predicted step time (ms)")
    ax.set_ylabel("measured step time (ms, under load)")
    ax.set_title(f"gpupar plan, CPU/gloo: Spearman {rho:.2f}")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
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
