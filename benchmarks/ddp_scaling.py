"""DDP on CPU: scaling from 1 to 2 ranks, and gpupar's DDP step against a hand-written DDP loop.

The workload: MLP of 4 Linear layers of width 1024 (10 inputs, 1 output, ~2.1 M weights),
global batch 512, Adam, MSE, fp32, on CPU with one thread per rank (so world 2 uses 2 cores
and world 1 uses 1: the efficiency measures communication, not thread splitting). Every
measurement is a fresh set of processes through `gpupar bench`'s machinery (median step
time after warm-up, slowest rank per step); the runs are interleaved, REPEATS rounds, and
each figure is the median over rounds.

Figures:
  scaling efficiency = throughput(ddp, 2 ranks) / (2 x throughput(1 rank))   goal >= 0.85
  gpupar / raw       = gpupar DDP step time / hand-written DDP loop step time  target <= 1.02
Then one round per DDP tuning option at 2 ranks (bucket size, static graph, bf16 compression).

    python benchmarks/ddp_scaling.py [--repeats 3] [--steps 20] [--warmup 3] [--no-tuning]
"""

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from gpupar.bench.driver import run_combination, strategy_config
from gpupar.config import Config

TUNING = {  # label -> ParallelConfig overrides, tried at 2 ranks
    "bucket 1 MiB": {"ddp_bucket_mb": 1.0},
    "bucket 4 MiB": {"ddp_bucket_mb": 4.0},
    "static graph": {"ddp_static_graph": True},
    # bf16_compress_hook needs NCCL (CUDA); on gloo it raises, so CPU tries fp16 compression.
    "fp16 comm hook": {"ddp_comm_hook": "fp16"},
}


def workload() -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.hidden, cfg.model.layers = "mlp", 1024, 4
    cfg.train.batch_size, cfg.train.device = 512, "cpu"
    return cfg


def median_step(cfg: Config, out: Path, steps: int, warmup: int, peer: str | None = None,
                required: bool = True) -> float | None:
    row = run_combination(cfg, out, steps, warmup, peer=peer, threads=1)
    if "skipped" in row:
        if required:
            raise SystemExit(f"{out.name} failed: {row['skipped']}")
        print(f"{out.name} failed: {row['skipped']}")
        return None
    return row["median_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-tuning", action="store_true", help="skip the DDP tuning options")
    args = parser.parse_args()
    base, batch = workload(), workload().train.batch_size
    runs = Path(tempfile.mkdtemp(prefix="ddp_scaling-"))
    configs = {"single": strategy_config(base, "single", 1, args.steps, args.warmup),
               "ddp1": strategy_config(base, "ddp", 1, args.steps, args.warmup),
               "ddp2": strategy_config(base, "ddp", 2, args.steps, args.warmup)}
    times: dict[str, list[float]] = {k: [] for k in ("single", "ddp1", "raw1", "ddp2", "raw2")}
    for r in range(args.repeats):
        times["single"].append(median_step(configs["single"], runs / f"single-{r}", args.steps, args.warmup))
        for world in (1, 2):
            cfg = configs[f"ddp{world}"]
            times[f"ddp{world}"].append(median_step(cfg, runs / f"ddp{world}-{r}", args.steps, args.warmup))
            times[f"raw{world}"].append(median_step(cfg, runs / f"raw{world}-{r}", args.steps, args.warmup, "raw"))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    thr = {k: batch / v for k, v in med.items()}

    print(f"\nCPU, 1 thread per rank, MLP 4x1024, global batch {batch}, torch {torch.__version__}, "
          f"median of {args.repeats} rounds x {args.steps} steps")
    print("| run | step (ms) | samples/s |")
    print("|---|---:|---:|")
    for key, label in (("single", "single device, 1 thread"), ("raw1", "raw DDP, 1 rank"),
                       ("ddp1", "gpupar DDP, 1 rank"), ("raw2", "raw DDP, 2 ranks"), ("ddp2", "gpupar DDP, 2 ranks")):
        print(f"| {label} | {med[key] * 1e3:.1f} | {thr[key]:,.0f} |")
    print(f"\nscaling efficiency thr(ddp,2) / (2 x thr(ddp,1))   = {thr['ddp2'] / (2 * thr['ddp1']):.3f}  (goal >= 0.85)")
    print(f"scaling efficiency thr(ddp,2) / (2 x thr(single))  = {thr['ddp2'] / (2 * thr['single']):.3f}")
    print(f"gpupar / raw DDP step time, 1 rank  = {med['ddp1'] / med['raw1']:.3f}  (target <= 1.02)")
    print(f"gpupar / raw DDP step time, 2 ranks = {med['ddp2'] / med['raw2']:.3f}  (target <= 1.02)")

    if not args.no_tuning:
        print("\nDDP tuning at 2 ranks (one round each, against the default's median):")
        print("| option | step (ms) | scaling eff. |")
        print("|---|---:|---:|")
        print(f"| default (bucket 25 MiB) | {med['ddp2'] * 1e3:.1f} | {thr['ddp2'] / (2 * thr['ddp1']):.3f} |")
        for label, overrides in TUNING.items():
            cfg = copy.deepcopy(configs["ddp2"])
            for key, value in overrides.items():
                setattr(cfg.parallel, key, value)
            step = median_step(cfg, runs / label.replace(" ", "_"), args.steps, args.warmup, required=False)
            if step is None:
                continue
            print(f"| {label} | {step * 1e3:.1f} | {batch / step / (2 * thr['ddp1']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
