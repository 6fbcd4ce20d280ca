"""The GPU suite: every check and figure that needs a card, in one call; suite.json and suite.md.

    bash benchmarks/gpu_suite.sh [--device cuda] [--out DIR]     # one H100/H200: at most ~7 minutes
    bash benchmarks/gpu_suite.sh --device cpu --tiny              # CI: the same code at tiny sizes

Parts, in order (benchmarks/gpu_parts.py), each in its own process under its own time limit,
so a hang or a CUDA error in one is recorded and the others still run; each part's result is
written as soon as it ends (a lease cut short still returns what finished):
  tests         tests/test_gpu.py (pytest -m gpu): auto device, no host sync between log points
                (CUDA's sync detector), DDP and FSDP over NCCL, CUDA graphs, bf16, resume, plan
  gpt_eager     the built-in GPT at ~1B parameters, bf16, SDPA: tokens/s, MFU, peak memory
  classic       the classic example, gpupar.train (eager and --cuda-graphs) against the plain loop
  plan          `gpupar plan` at world 1 against torch.cuda.max_memory_allocated
  sweep         benchmarks/sweep_fusion.py: 64 classic models fused against sequential
  gpt_compiled  the GPT again under --compile (inductor's compile time is the risk: last)
  ac_diag       what a checkpointed step leaves allocated (before and after gc.collect())
  cpu_suite     the CPU test suite with the GPU hidden, under the card machine's torch (2.11)
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# seconds per part on a card (the tiny CPU run takes a few each)
PARTS = {"tests": 150, "gpt_eager": 75, "classic": 75, "plan": 60, "sweep": 60, "gpt_compiled": 120,
         "ac_diag": 40, "cpu_suite": 200}


def run_part(name: str, device: str, tiny: bool, out: Path) -> None:
    """In this process: one part, its result (or its error) written to out/NAME.json."""
    import torch

    import gpu_parts
    from gpupar.devices import pick_device

    dev = pick_device(device)
    began = time.perf_counter()
    try:
        result = getattr(gpu_parts, f"part_{name}")(dev, tiny)
    except Exception as exc:  # recorded; the suite goes on
        result = {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                  "where": traceback.format_exc().strip().splitlines()[-6:]}
    result["seconds"] = round(time.perf_counter() - began, 1)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


def failed(name: str, row: dict) -> bool:
    return "error" in row or (name in ("tests", "cpu_suite") and row.get("returncode") not in (None, 0, 5))


def markdown(summary) -> str:
    env = summary["environment"]
    lines = [f"# gpupar GPU suite ({'tiny' if summary['tiny'] else 'full'}), {env['date']}", "",
             f"device {env['device']}, torch {env['torch']}, load average {env['load_average']}, "
             f"{summary['wall_s']:.0f} s", "", "| part | result |", "|---|---|"]
    for name, row in summary["parts"].items():
        row = {k: v for k, v in row.items() if k != "log"}
        lines.append(f"| {name} | {json.dumps(row, default=str)[:600].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CI on CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part here
    args = parser.parse_args()
    out = Path(args.out or f"runs/gpu-suite-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, args.device, args.tiny, out)
        return 0
    import torch

    from gpupar.devices import describe, pick_device

    began, parts = time.perf_counter(), {}
    for name in args.parts.split(","):
        if name not in PARTS:
            parser.error(f"--parts: unknown part {name!r}; the parts are {', '.join(PARTS)}")
        cmd = [sys.executable, __file__, "--part", name, "--device", args.device, "--out", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True,
                                  timeout=PARTS[name] * (4 if args.tiny else 1))
            result = out / f"{name}.json"
            parts[name] = json.loads(result.read_text()) if result.exists() else \
                {"error": f"exit {proc.returncode}", "where": proc.stderr.strip().splitlines()[-6:]}
        except subprocess.TimeoutExpired:
            parts[name] = {"error": f"timed out after {PARTS[name]} s"}
        parts[name].setdefault("seconds", round(time.perf_counter() - start, 1))
        shown = {k: v for k, v in parts[name].items() if k != "log"}
        print(f"{name}: {json.dumps(shown, default=str)[:1500]}", flush=True)
    device = pick_device(args.device)
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": describe(device), "torch": torch.__version__,
           "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    summary = {"environment": env, "tiny": args.tiny, "wall_s": time.perf_counter() - began, "parts": parts}
    (out / "suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "suite.md").write_text(markdown(summary))
    print(f"Wrote {out / 'suite.json'} and {out / 'suite.md'}")
    bad = [n for n, r in parts.items() if failed(n, r)]
    if bad:
        print(f"FAILED parts: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
