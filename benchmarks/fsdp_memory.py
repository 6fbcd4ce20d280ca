"""Per-rank memory and throughput of DDP against FSDP at W = 2 and 4 (CPU/gloo by default).

Each configuration is a real `gpupar train` run (self-launched ranks) on an MLP of about
50M parameters (``--hidden 2048 --layers 13``: 12 Linear 2048x2048 layers), one global
batch per epoch, logged every epoch. Persistent memory is what each rank's report counts
from its local tensors (parameters + gradients + Adam state); throughput is the median
samples/s over the logged steps after the first two (warm-up). The runs alternate
DDP, FSDP at each W, so a busy machine slows both alike.

Targets: FSDP / DDP persistent bytes per rank <= 1/W + 5%; FSDP throughput >= 0.7 x DDP.

    python benchmarks/fsdp_memory.py [--worlds 2 4] [--hidden 2048] [--layers 13] [--steps 8]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(strategy: str, world: int, args, root: Path) -> dict:
    run_dir = root / f"{strategy}{world}"
    cmd = [sys.executable, "-m", "gpupar", "train", "--strategy", strategy, "--nproc-per-node", str(world),
           "--model", "mlp", "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--samples", str(args.batch), "--batch-size", str(args.batch), "--epochs", str(args.steps),
           "--log-every", "1", "--progress", "false", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} W={world} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["samples_per_s"] for r in records if "samples_per_s" in r][2:]
    memory = [r for r in records if r.get("event") == "memory"]
    return {"samples_per_s": statistics.median(steps),
            "persistent": max(r["persistent_bytes"] for r in memory),
            "peak_rss": max(r["peak_bytes"] for r in memory)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--batch", type=int, default=64, help="global batch (samples per step)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    params = 10 * args.hidden + args.hidden + (args.layers - 2) * (args.hidden ** 2 + args.hidden) + args.hidden + 1
    print(f"mlp --hidden {args.hidden} --layers {args.layers}: {params / 1e6:.1f}M parameters, "
          f"global batch {args.batch}, {args.steps} steps")
    mib = 1024 ** 2
    print(f"{'W':>3}  {'DDP MiB/rank':>12}  {'FSDP MiB/rank':>13}  {'ratio':>6}  {'target':>6}  "
          f"{'DDP samples/s':>13}  {'FSDP samples/s':>14}  {'ratio':>6}  {'peak RSS DDP/FSDP MiB':>22}")
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            ddp, fsdp = run("ddp", world, args, Path(tmp)), run("fsdp", world, args, Path(tmp))
            mem, speed = fsdp["persistent"] / ddp["persistent"], fsdp["samples_per_s"] / ddp["samples_per_s"]
            print(f"{world:>3}  {ddp['persistent'] / mib:12.1f}  {fsdp['persistent'] / mib:13.1f}  {mem:6.3f}  "
                  f"{1 / world + 0.05:6.3f}  {ddp['samples_per_s']:13.1f}  {fsdp['samples_per_s']:14.1f}  "
                  f"{speed:6.2f}  {ddp['peak_rss'] / mib:10.0f} / {fsdp['peak_rss'] / mib:.0f}", flush=True)


if __name__ == "__main__":
    main()
