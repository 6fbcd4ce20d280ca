"""Argument parsing and sub-commands only; the work happens in the modules it calls.

Config flags are generated from the dataclasses in config.py, so every field is a flag
with its help text. Only flags given on the command line override the TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

from gpupar.config import Config, field_type, flag, load_toml, merge, sections, to_toml
from gpupar.errors import TrainingError, UsageError, stdout_closed


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, never the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.replace(", 'bench-worker'", "")  # internal: not in the list of commands
        raise UsageError(f"{self.prog}: {message} (see --help)")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


def _number(kind: type) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}; expected {'an integer' if kind is int else 'a number'}") from None
    return convert


def add_config_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per config field (all of them, or the sections named in ``only``)."""
    parser.add_argument("--config", metavar="FILE.toml", help="TOML config; CLI flags override it")
    for section, cls in sections():
        if only is not None and section not in only:
            continue
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            kind, choices = field_type(f), f.metadata.get("choices")
            help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                      "help": help_text}
            if kind is bool:
                kwargs.update(type=parse_bool, nargs="?", const=True, metavar="true|false")
            elif kind in (int, float):
                kwargs.update(type=_number(kind), metavar=kind.__name__.upper())
            else:
                kwargs.update(metavar="|".join(choices) if choices else "VALUE")
            group.add_argument(flag(f), **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < --config TOML < flags given on the command line; then validated."""
    cfg = load_toml(args.config) if getattr(args, "config", None) else Config()
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    return merge(cfg, overrides, "command line").validate()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gpupar", description="GPU parallelism for PyTorch training scripts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("train", help="train a model (the classic example by default)")
    add_config_flags(p)
    p.add_argument("--print-config", action="store_true", help="print the effective config as TOML and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("verify", help="train with a strategy and with one device, and compare them")
    add_config_flags(p)
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance for losses and parameters (default: 1e-5 fp32, 2e-2 bf16/fp16)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("predict", help="batched inference with saved weights (data-parallel with --nproc-per-node)")
    p.add_argument("--weights", required=True, help="model.safetensors (its run's config.toml rebuilds the model)")
    p.add_argument("--data", required=True, help="input rows: .csv, .npz or .pt (a target column is dropped)")
    p.add_argument("--out", required=True, help="CSV file to write, one prediction per input row, in order")
    p.add_argument("--batch-size", type=_number(int), default=4096, help="rows per forward pass")
    add_config_flags(p, only=("parallel",))
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a checkpoint's full weights as one safetensors file")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, RUN/checkpoints/step-N")
    p.add_argument("--out", required=True, help="the .safetensors file to write (gpupar predict --weights reads it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="time strategies x world sizes: throughput, MFU, memory, scaling; report + plots")
    add_config_flags(p)
    p.add_argument("--strategies", default="single,ddp", help="comma list of single, ddp, fsdp, tp, pp")
    p.add_argument("--world-sizes", default="1,2", help="comma list of rank counts")
    p.add_argument("--steps", type=_number(int), default=20, help="timed steps per combination")
    p.add_argument("--warmup", type=_number(int), default=3, help="untimed steps before them")
    p.add_argument("--out", default=None, help="output folder (default runs/bench-<timestamp>)")
    p.add_argument("--peers", default="", help="also run the DDP workload with: raw, fabric, accelerate")
    p.add_argument("--peak-tflops", type=_number(float), default=None, help="peak TFLOP/s per device for MFU")
    p.add_argument("--threads-per-rank", type=_number(int), default=None, help="CPU threads in each rank")
    p.add_argument("--update-markdown", metavar="FILE.md", default=None,
                   help="also write the report into FILE between <!-- gpupar bench: LABEL --> markers")
    p.add_argument("--label", default="bench", help="the marker label for --update-markdown")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-worker")  # no help: internal, one rank of one bench combination
    p.add_argument("--config", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--peer", default=None)
    p.set_defaults(func=lambda a: bench_worker(a.config, a.result, a.steps, a.warmup, a.peer) or 0)

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

    p = sub.add_parser("info", help="print torch, devices, backends and CPU cores")
    p.set_defaults(func=cmd_info)
    return parser


def _topology(cfg: Config):
    """This process's topology: a rank of a launched job, or the single best device."""
    from gpupar.devices import pick_device
    from gpupar.topology import Topology, launched_by_torchrun

    if launched_by_torchrun():
        return Topology.from_env(cfg)
    return Topology.single(pick_device(cfg.train.device))


def _needs_launch(cfg: Config) -> bool:
    """Multi-process strategies start their ranks here, unless torchrun already did."""
    from gpupar.topology import launched_by_torchrun

    if cfg.parallel.strategy in ("single", "dp", "layer-split"):
        if (cfg.parallel.nproc_per_node or 1) > 1:
            raise UsageError(f"--nproc-per-node {cfg.parallel.nproc_per_node} needs a multi-process "
                             "--strategy, for example ddp")
        return False
    if launched_by_torchrun():
        return False
    check_degrees_before_launch(cfg)
    return True


def check_degrees_before_launch(cfg: Config) -> None:
    """HSDP degrees that cannot fit the ranks about to start fail here, once, not in every rank."""
    if cfg.parallel.strategy == "hsdp":
        from gpupar.launch import plan
        from gpupar.parallel.fsdp import hsdp_degrees

        lp = plan(cfg)
        hsdp_degrees(lp.nproc_per_node * lp.nnodes, cfg.parallel.dp_replicate, cfg.parallel.dp_shard,
                     lp.nproc_per_node)


def _launch(cfg: Config, command: str, *extra: str) -> None:
    """Write the effective config into the run directory and start `gpupar COMMAND` on every
    rank with it (plus ``extra`` flags that are not config fields)."""
    from pathlib import Path

    from gpupar.launch import run_workers
    from gpupar.parallelize import preflight

    if cfg.parallel.nproc_per_node:  # bad --dp/--tp/--pp: one error here, not one per rank
        preflight(cfg, cfg.parallel.nproc_per_node * cfg.parallel.nnodes)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "launch.toml").write_text(to_toml(cfg))
    run_workers(cfg, [command, "--config", str(run_dir / "launch.toml"), *extra])


def cmd_train(args: argparse.Namespace) -> int:
    from gpupar.run import default_run_dir, train_from_config
    from gpupar.tracking import check_available

    cfg = config_from_args(args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    check_available(cfg.track.track)  # a missing extra fails here, before any rank starts
    if _needs_launch(cfg):
        cfg.train.run_dir = str(default_run_dir(cfg))  # one run directory for all ranks
        _launch(cfg, "train")
        return 0
    topo = _topology(cfg)
    if topo.world_size > 1 and cfg.parallel.strategy == "single":
        raise UsageError(f"{topo.world_size} ranks were launched but --strategy is single; use --strategy ddp")
    train_from_config(cfg, topo)
    topo.close()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gpupar.run import default_run_dir
    from gpupar.verify import report, run_verify

    cfg = config_from_args(args)
    if cfg.parallel.strategy == "single":
        raise UsageError("gpupar verify compares a strategy with one device: pass --strategy ddp (or another)")
    _needs_launch(cfg)  # checks the launch flags (HSDP degrees) before the reference trains
    cfg.train.run_dir = str(default_run_dir(cfg))

    def launch(strategy_cfg: Config) -> None:
        if _needs_launch(strategy_cfg):
            _launch(strategy_cfg, "train")
        else:
            from gpupar.run import train_from_config

            train_from_config(strategy_cfg, _topology(strategy_cfg), log=lambda _: None)

    verdict = run_verify(cfg, launch, args.rtol)
    print(report(verdict, cfg.parallel.strategy))
    return 0 if verdict.passed else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpupar.predict import check_request, model_config_for, predict_rows, write_predictions

    cfg = config_from_args(args)
    check_request(args.out, args.batch_size)
    if cfg.parallel.nproc_per_node and cfg.parallel.nproc_per_node > 1:
        cfg.parallel.strategy = "ddp"
    if _needs_launch(cfg):
        from gpupar.launch import run_workers

        forwarded = ["predict", "--weights", args.weights, "--data", args.data, "--out", args.out,
                     "--batch-size", str(args.batch_size), "--timeout", str(cfg.parallel.timeout)]
        run_workers(cfg, forwarded)
        print(f"Wrote predictions to {args.out}")
        return 0
    topo = _topology(cfg)
    saved = model_config_for(Path(args.weights))
    preds = predict_rows(args.weights, args.data, topo, args.batch_size, saved)
    if topo.is_main:
        write_predictions(preds, args.out, saved.data.task)
        if not topo.distributed:
            print(f"Wrote {len(preds)} predictions to {args.out}")
    topo.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from gpupar.checkpoint import export_weights

    out = export_weights(Path(args.checkpoint), Path(args.out))
    # predict rebuilds the model from the config.toml beside the weights: copy the run's.
    run_config = Path(args.checkpoint).resolve().parent.parent / "config.toml"
    if run_config.is_file() and not (out.parent / "config.toml").exists():
        shutil.copyfile(run_config, out.parent / "config.toml")
    print(f"Wrote the full weights of {args.checkpoint} to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex
    import time
    from pathlib import Path

    from gpupar.bench import BenchSpec, run_bench
    from gpupar.bench_report import _pyplot, markdown, update_markdown, write_outputs
    from gpupar.sweep import parse_list

    cfg = config_from_args(args)
    _pyplot()  # fail now, not after the runs, when matplotlib is missing
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    spec = BenchSpec(base=cfg, strategies=_comma_list(args.strategies, "--strategies"),
                     world_sizes=parse_list(args.world_sizes, int, "--world-sizes"),
                     steps=args.steps, warmup=args.warmup, out=out,
                     peers=_comma_list(args.peers, "--peers") if args.peers else [],
                     peak_tflops=args.peak_tflops, threads_per_rank=args.threads_per_rank,
                     command="gpupar " + shlex.join(args.command_line))
    summary = run_bench(spec)
    files = write_outputs(summary, out)
    print(markdown(summary), end="")
    if args.update_markdown:
        update_markdown(Path(args.update_markdown), args.label, markdown(summary))
    print(f"Wrote {', '.join(str(f) for f in files)}")
    return 0


def _comma_list(text: str, name: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{name} {text!r}: expected a comma-separated list")
    return items


def bench_worker(*args) -> None:
    from gpupar.bench import bench_worker as worker

    worker(*args)

def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--seeds", default="0", help="weight-init seeds: ranges and lists, like 0-63 or 1,2,5 (default: 0)")
    g.add_argument("--lr", dest="sweep_lr", metavar="LR,...", help="learning rates, like 0.001,0.01,0.1 (default: 0.01)")
    g.add_argument("--hidden", dest="sweep_hidden", metavar="H,...", help="hidden widths, like 32,50,64 (default: 50)")
    g.add_argument("--max-fused", type=_number(int), metavar="K", help="at most K models per fused chunk")
    g.add_argument("--export-best", metavar="PATH.safetensors",
                   help="write the best model there (and its config.toml beside it) for gpupar predict")
    for flags, dest, kind, help_text in (
            (("--epochs",), "train.epochs", int, "passes over the training data (default: 100)"),
            (("--batch-size",), "train.batch_size", int, "batch size; none = full batch"),
            (("--max-steps",), "train.max_steps", int, "stop after this many optimizer steps"),
            (("--log-every",), "train.log_every", int, "record the train loss every N epochs (default: 20)"),
            (("--data-seed",), "train.seed", int, "seed of the shared data: synthetic draw, split, shuffle (default: 42)"),
            (("--device",), "train.device", str, "auto, cpu, cuda, cuda:N or mps"),
            (("--run-dir", "--out"), "train.run_dir", str, "output directory (default: runs/sweep-<timestamp>)"),
            (("--nproc-per-node",), "parallel.nproc_per_node", int, "ranks to shard the sweep across")):
        g.add_argument(*flags, dest=dest, type=_number(int) if kind is int else str, default=argparse.SUPPRESS,
                       help=help_text)


def cmd_sweep(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from gpupar.models import hidden_width
    from gpupar.sweep import grid, parse_list, parse_seeds, run_sweep, table, write_outputs
    from gpupar.topology import launched_by_torchrun
    from gpupar.weights import check_weights_out

    cfg = config_from_args(args)
    if "data.val_fraction" not in vars(args) and cfg.data.val_fraction == 0.0:
        cfg.data.val_fraction = 0.2  # a sweep ranks its models by validation loss
    members = grid(parse_seeds(args.seeds), parse_list(args.sweep_lr, float, "--lr") if args.sweep_lr is not None
                   else [cfg.optim.lr], parse_list(args.sweep_hidden, int, "--hidden")
                   if args.sweep_hidden is not None else [hidden_width(cfg.model)])
    if args.export_best is not None:  # a bad path fails now, not after the training
        check_weights_out(args.export_best, "--export-best")
    if args.max_fused is not None and args.max_fused < 1:
        raise UsageError(f"--max-fused {args.max_fused} must be a positive integer")
    run_dir = Path(cfg.train.run_dir or Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    cfg.train.run_dir = str(run_dir)
    if (cfg.parallel.nproc_per_node or 1) > 1 and not launched_by_torchrun():
        _launch_sweep(cfg, args)
        return 0
    topo = _topology(cfg)
    sweep = run_sweep(cfg, members, topo, args.max_fused, log=print if topo.is_main else lambda _: None)
    if topo.is_main:
        print(table(sweep.results))
        write_outputs(sweep, cfg, run_dir, args.export_best)
        b = sweep.best.member
        print(f"{len(sweep.results)} models in {sweep.chunks} fused chunk(s), {sweep.wall_time:.2f} s on "
              f"{topo.device}; best: model {b.index} (seed {b.seed}, lr {b.lr:g}, hidden {b.hidden})")
        print(f"Saved sweep to {run_dir}/ (sweep.jsonl, best.json, best/model.safetensors)"
              + (f"; best model exported to {args.export_best}" if args.export_best else ""))
    topo.close()
    return 0


def _launch_sweep(cfg: Config, args: argparse.Namespace) -> None:
    """Start `gpupar sweep` on every rank with the effective config; each trains its slice."""
    extra = ["--seeds", args.seeds]
    for flag_name, value in (("--lr", args.sweep_lr), ("--hidden", args.sweep_hidden),
                             ("--max-fused", args.max_fused), ("--export-best", args.export_best)):
        if value is not None:
            extra += [flag_name, str(value)]
    _launch(cfg, "sweep", *extra)



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
    try:
        _require_torch()
        args = parser.parse_args(argv)
        args.command_line = argv
        return args.func(args)
    except UsageError as exc:
        print(f"gpupar{_rank_tag()}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"gpupar{_rank_tag()}: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpupar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpupar runs | head -1`: the reader has gone
        return stdout_closed()
    except Exception as exc:
        if not _rank_tag() or os.environ.get("GPUPAR_DEBUG"):
            raise
        # A worker's crash: one line, so the launcher's report of the failing rank stays readable.
        first = (str(exc).strip().splitlines() or [""])[0]
        if "gloo" in first or "NCCL" in first:  # a collective broke: the cause is another rank
            print(f"gpupar{_rank_tag()}: failed: {type(exc).__name__}: {first} (a peer rank died or is stuck; "
                  "see its message)", file=sys.stderr)
            return PEER_FAILED
        print(f"gpupar{_rank_tag()}: failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1


PEER_FAILED = 3  # a worker's exit code when only a collective with a failed peer broke


def _rank_tag() -> str:
    """' [rank N]' inside a launched worker, so every message says where it came from."""
    return f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "LOCAL_RANK" in os.environ else ""


def _require_torch() -> None:
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        raise UsageError(f"torch {torch.__version__} is too old; gpupar needs torch>=2.6 "
                         "(safe weights_only loading and FSDP2)")
