"""Argument parsing and dispatch only: each command hands its config to the module that does the work.

Where a job runs (here, or in ranks it starts) is ``launch.run``'s choice, after every check
that needs no rank; the flags come from the config dataclasses (``flags.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from gpupar.config_file import to_toml
from gpupar.errors import (Interrupted, TrainingError, UsageError, first_line, guard_streams, in_main_thread,
                           raise_interrupted, stdout_closed)
from gpupar.flags import (OneLineParser, add_config_flags, add_sweep_flags, add_verify_flags, config_from_args,
                          number)

PEER_FAILED = 3  # a worker's exit code when only a collective with a failed peer broke


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gpupar", description="GPU parallelism for PyTorch training scripts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("train", help="train a model (the classic example by default)")
    add_config_flags(p)
    p.add_argument("--print-config", action="store_true", help="print the effective config as TOML and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("verify", help="train with a strategy and with one device, and compare them")
    add_config_flags(p)
    add_verify_flags(p)
    p.add_argument("script", nargs="*", metavar="-- python SCRIPT.py [args]",
                   help="verify your own loop (with gpupar.setup): the script on one process and in ranks")
    p.set_defaults(func=cmd_verify)

    _add_predict(sub)

    p = sub.add_parser("export", help="write a run's or a checkpoint's full weights: one safetensors file, or "
                                      "a Hugging Face save_pretrained directory for an hf: model")
    p.add_argument("--run", help="a run directory: its final weights (model.safetensors)")
    p.add_argument("--checkpoint", help="a checkpoint directory, RUN/checkpoints/step-N")
    p.add_argument("--out", required=True, help="the .safetensors file to write (gpupar predict --weights reads "
                                                "it); for an hf: model, a new directory from_pretrained loads")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="time strategies x world sizes: throughput, MFU, memory, scaling; report + plots")
    add_config_flags(p)
    p.add_argument("--strategies", default="single,ddp", help="comma list of single, ddp, fsdp, tp, pp")
    p.add_argument("--world-sizes", default="1,2", help="comma list of rank counts")
    p.add_argument("--steps", type=number(int), default=20, help="timed steps per combination")
    p.add_argument("--warmup", type=number(int), default=3, help="untimed steps before them")
    p.add_argument("--out", default=None, help="output folder (default runs/bench-<timestamp>)")
    p.add_argument("--peers", default="", help="also run the DDP workload with: raw, fabric, accelerate")
    p.add_argument("--peak-tflops", type=number(float), default=None, help="peak TFLOP/s per device for MFU")
    p.add_argument("--threads-per-rank", type=number(int), default=None, help="CPU threads in each rank")
    p.add_argument("--update-markdown", metavar="FILE.md", default=None,
                   help="also write the report into FILE between <!-- gpupar bench: LABEL --> markers")
    p.add_argument("--label", default="bench", help="the marker label for --update-markdown")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="predict per-rank memory and step time of every layout, fastest first")
    add_config_flags(p)
    p.add_argument("--world-sizes", default=None, help="comma list of rank counts (default: --nproc-per-node x "
                   "--nnodes, or 1,2,4,8)")
    p.add_argument("--json", action="store_true", help="print JSON (for tools) instead of the table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench-worker")  # no help: internal, one rank of one bench combination
    p.add_argument("--config", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--peer", default=None)
    p.set_defaults(func=cmd_bench_worker)

    p = sub.add_parser("sweep", help="train a grid of seeds x learning rates x widths as one fused program",
                       conflict_handler="resolve")  # its --lr and --hidden take lists
    add_config_flags(p, only=("model", "data", "optim"))
    add_sweep_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("runs", help="list past runs: name, date, model, strategy, ranks, final loss, wall time")
    p.add_argument("--run-root", default="runs", help="directory holding the run directories (default: runs)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", help="plot a run's loss (and validation loss) curve to RUN/loss.png")
    p.add_argument("run", metavar="RUN", help="a run directory, for example runs/20261126-203603")
    p.add_argument("--out", default=None, help="PNG file to write (default: RUN/loss.png)")
    p.set_defaults(func=cmd_report)

    _add_run(sub)

    p = sub.add_parser("info", help="print torch, devices, backends and CPU cores")
    p.set_defaults(func=cmd_info)
    return parser


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="batched inference with saved weights (data-parallel with --nproc-per-node)")
    p.add_argument("--weights", required=True, help="model.safetensors (its run's config.toml rebuilds the model)")
    p.add_argument("--data", required=True, help="input rows: .csv, .npz or .pt (a target column is dropped)")
    p.add_argument("--out", required=True, help="CSV file to write, one prediction per input row, in order")
    p.add_argument("--batch-size", type=number(int), default=4096, help="rows per forward pass")
    p.add_argument("--model", default=None, metavar="package.module:factory",
                   help="the factory to build, when the run's config.toml names one (never imported from the file alone)")
    add_config_flags(p, only=("parallel",))
    p.set_defaults(func=cmd_predict)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="launch any script (yours, with gpupar.setup) in N ranks with gpupar's launcher")
    add_config_flags(p, only=("parallel",))
    p.add_argument("script", help="the Python script every rank runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=cmd_run)


def cmd_train(args: argparse.Namespace) -> int:
    from gpupar import launch
    from gpupar.job import train_from_config
    from gpupar.tracking import check_tracking

    cfg = config_from_args(args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    check_tracking(cfg)  # a missing extra or an unusable URI fails here, before any rank starts
    launch.run(cfg, "train", lambda topo, run: train_from_config(cfg, topo, run))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gpupar.parity import report, run_verify
    from gpupar.parity.harness import VerifyOptions

    cfg = config_from_args(args)
    options = VerifyOptions(args.band, args.no_dropout, args.nudge_init, args.first_grads, args.save_step_losses)
    if args.rtol is not None and not (0 < args.rtol < float("inf")):  # nan fails this too: both runs, then FAIL
        raise UsageError(f"--rtol {args.rtol} must be a positive finite number (a relative tolerance)")
    if args.script:  # `gpupar verify -- python script.py`: the user's own loop
        from gpupar.ownloop.parity import verify_script

        return verify_script(cfg, [d for d in vars(args) if "." in d], args.script, args.rtol, options)
    verdict = run_verify(cfg, args.rtol, options=options)
    if verdict is None:  # one rank of the strategy run
        return 0
    print(report(verdict))
    return 0 if verdict.passed else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from gpupar.predict import main as predict

    predict(config_from_args(args), args.weights, args.data, args.out, args.batch_size, args.model)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gpupar.export import export

    written = export(args.run, args.checkpoint, args.out)
    print(f"Wrote the full weights of {args.checkpoint or args.run} to {written}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from gpupar.bench.driver import main as bench

    bench(config_from_args(args), args)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from gpupar.plan import parse_worlds, run_plan

    cfg = config_from_args(args)
    p = cfg.parallel
    worlds = args.world_sizes or (str((p.nproc_per_node or 1) * p.nnodes) if p.nproc_per_node else "1,2,4,8")
    run_plan(cfg, parse_worlds(worlds), p.device_memory, args.json)
    return 0


def cmd_bench_worker(args: argparse.Namespace) -> int:
    from gpupar.bench.worker import bench_worker

    bench_worker(args.config, args.result, args.steps, args.warmup, args.peer)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gpupar.sweep import main as sweep

    sweep(config_from_args(args), args)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpupar.runs import runs_table

    print(runs_table(Path(args.run_root)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpupar.runs import plot_run

    out = plot_run(Path(args.run), Path(args.out) if args.out else None)
    print(f"Wrote the loss curve to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gpupar.ownloop.script import run_script

    return run_script(config_from_args(args), args.script, args.script_args, args.command_line[1:])


def cmd_info(args: argparse.Namespace) -> int:
    from gpupar.devices import info_lines

    print("\n".join(info_lines()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    # SIGTERM stops the launcher like Ctrl-C (a rank is stopped by its launcher); put back after.
    previous = signal.signal(signal.SIGTERM, raise_interrupted) if not rank_tag() and in_main_thread() else None
    restore_streams = guard_streams()  # a closed stdout loses log lines, never the run
    try:
        _require_torch()
        args = parser.parse_args(argv)
        args.command_line = argv
        return args.func(args)
    except (KeyboardInterrupt, Interrupted) as exc:
        if not rank_tag():
            print("gpupar: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except UsageError as exc:
        print(f"gpupar{rank_tag()}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"gpupar{rank_tag()}: training failed: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `gpupar runs | head -1`: the reader has gone
        return stdout_closed()
    except Exception as exc:
        if not rank_tag() or os.environ.get("GPUPAR_DEBUG"):
            raise
        # A worker's crash: one line, so the launcher's report of the failing rank stays readable.
        first = first_line(exc, "")
        if "gloo" in first or "NCCL" in first:  # a collective broke: the cause is another rank
            print(f"gpupar{rank_tag()}: failed: {type(exc).__name__}: {first} (a peer rank died or is stuck; "
                  "see its message)", file=sys.stderr)
            return PEER_FAILED
        print(f"gpupar{rank_tag()}: failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        restore_streams()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def rank_tag() -> str:
    """' [rank N]' inside a launched worker, so every message says where it came from."""
    return f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "LOCAL_RANK" in os.environ else ""


def _require_torch() -> None:
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        raise UsageError(f"torch {torch.__version__} is too old; gpupar needs torch>=2.6 "
                         "(safe weights_only loading and FSDP2)")
