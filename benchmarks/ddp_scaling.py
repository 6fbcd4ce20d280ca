"""DDP and FSDP on CPU: scaling from 1 to 2 ranks, and gpupar's DDP step against a hand-written DDP loop.

The workload: MLP of 4 Linear layers of width 1024 (10 inputs, 1 output, ~2.1 M weights),
global batch 512, Adam, MSE, fp32, on CPU with one thread per rank (so world 2 uses 2 cores
and world 1 uses 1: the efficiency measures communication, not thread splitting). Every
measurement is a fresh set of processes through `gpupar bench`'s machinery (median step
time after warm-up, slowest rank per step); the runs are interleaved, REPEATS rounds, and
each figure is the median over rounds.

Figures:
  scaling efficiency = throughput(ddp, 2 ranks) / (2 x throughput(1 rank))   goal >= 0.85
  gpupar / raw       = gpupar DDP step time / hand-written DDP loop step time  target <= 1.02
  fsdp efficiency    = throughput(fsdp, 2 ranks) / (2 x throughput(fsdp, 1 rank))  goal >= 0.70
Each figure is printed with min and median over the interleaved rounds and the load average,
and as paste-ready BENCHMARKS.md rows. Then one round per tuning option at 2 ranks (DDP bucket
size, static graph, fp16 compression; FSDP without resharding after forward, one unit).

    python benchmarks/ddp_scaling.py [--repeats 3] [--steps 20] [--warmup 3] [--no-tuning] [--no-fsdp]
"""

import argparse
import copy
import os
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
FSDP_TUNING = {  # tried on fsdp at 2 ranks
    "fsdp no reshard after forward": {"reshard_after_forward": False},
    "fsdp one unit (root only)": {"fsdp_blocks": "none"},
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
    parser.add_argument("--no-tuning", action="store_true", help="skip the tuning options")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP rows")
    args = parser.parse_args()
    base, batch = workload(), workload().train.batch_size
    runs = Path(tempfile.mkdtemp(prefix="ddp_scaling-"))
    load_start = os.getloadavg()[0]
    configs = {"single": strategy_config(base, "single", 1, args.steps, args.warmup),
               "ddp1": strategy_config(base, "ddp", 1, args.steps, args.warmup),
               "ddp2": strategy_config(base, "ddp", 2, args.steps, args.warmup)}
    keys = ["single", "ddp1", "raw1", "ddp2", "raw2"]
    if not args.no_fsdp:
        configs.update(fsdp1=strategy_config(base, "fsdp", 1, args.steps, args.warmup),
                       fsdp2=strategy_config(base, "fsdp", 2, args.steps, args.warmup))
        keys += ["fsdp1", "fsdp2"]
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.repeats):
        order = keys if r % 2 == 0 else keys[::-1]  # alternate: drift in the machine's load cancels
        for key in order:
            peer = "raw" if key.startswith("raw") else None
            cfg = configs[key.replace("raw", "ddp")]
            times[key].append(median_step(cfg, runs / f"{key}-{r}", args.steps, args.warmup, peer))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
              flush=True)
    load = f"{load_start:.2f} -> {os.getloadavg()[0]:.2f}"
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    thr = {k: batch / v for k, v in med.items()}

    print(f"\nCPU, 1 thread per rank, MLP 4x1024, global batch {batch}, torch {torch.__version__}, "
          f"{args.repeats} interleaved rounds x {args.steps} steps, load average {load}")
    print("| run | step min (ms) | step median (ms) | samples/s (median) |")
    print("|---|---:|---:|---:|")
    labels = {"single": "single device, 1 thread", "raw1": "raw DDP, 1 rank", "ddp1": "gpupar DDP, 1 rank",
              "raw2": "raw DDP, 2 ranks", "ddp2": "gpupar DDP, 2 ranks", "fsdp1": "gpupar FSDP, 1 rank",
              "fsdp2": "gpupar FSDP, 2 ranks"}
    for key in keys:
        print(f"| {labels[key]} | {low[key] * 1e3:.1f} | {med[key] * 1e3:.1f} | {thr[key]:,.0f} |")

    def eff(two, one, table):
        return table[one] / table[two] / 2  # throughput(2) / (2 x throughput(1)) from step times

    command = f"python benchmarks/ddp_scaling.py --repeats {args.repeats} --steps {args.steps}"
    rows = [("DDP efficiency at world 2 (goal >= 0.85)", "ddp2", "ddp1"),
            ("raw DDP efficiency at world 2", "raw2", "raw1")]
    if not args.no_fsdp:
        rows.append(("FSDP efficiency at world 2 (goal >= 0.70)", "fsdp2", "fsdp1"))
    print("\n| command | figure | median | min | load |\n|---|---|---:|---:|---|")
    for label, two, one in rows:
        print(f"| `{command}` | {label} | {eff(two, one, med):.3f} | {eff(two, one, low):.3f} | {load} |")
    for world in (1, 2):
        print(f"| `{command}` | gpupar / raw DDP step, {world} rank(s) (target <= 1.02) | "
              f"{med[f'ddp{world}'] / med[f'raw{world}']:.3f} | {low[f'ddp{world}'] / low[f'raw{world}']:.3f} | {load} |")

    if not args.no_tuning:
        print("\nTuning at 2 ranks (one round each, against the default's median):")
        print("| option | step (ms) | scaling eff. |")
        print("|---|---:|---:|")
        print(f"| ddp default (bucket 25 MiB) | {med['ddp2'] * 1e3:.1f} | {eff('ddp2', 'ddp1', med):.3f} |")
        tuning = [(k, v, "ddp") for k, v in TUNING.items()]
        if not args.no_fsdp:
            print(f"| fsdp default | {med['fsdp2'] * 1e3:.1f} | {eff('fsdp2', 'fsdp1', med):.3f} |")
            tuning += [(k, v, "fsdp") for k, v in FSDP_TUNING.items()]
        for label, overrides, kind in tuning:
            cfg = copy.deepcopy(configs[f"{kind}2"])
            for key, value in overrides.items():
                setattr(cfg.parallel, key, value)
            step = median_step(cfg, runs / label.replace(" ", "_"), args.steps, args.warmup, required=False)
            if step is None:
                continue
            print(f"| {label} | {step * 1e3:.1f} | {med[f'{kind}1'] / step / 2:.3f} |", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
