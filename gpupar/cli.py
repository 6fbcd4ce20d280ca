"""Argument parsing and sub-commands only; the work happens in the modules it calls.

Config flags are generated from the dataclasses in config.py, so every field is a flag
with its help text. Only flags given on the command line override the TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

from gpupar.config import Config, field_type, flag, load_toml, merge, sections, to_toml
from gpupar.errors import TrainingError, UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, never the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
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

    p = sub.add_parser("sweep", help="train a grid of seeds x learning rates x widths as one fused program",
                       conflict_handler="resolve")  # its --lr and --hidden take lists
    add_config_flags(p, only=("model", "data", "optim"))
    add_sweep_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("info", help="print torch, devices, backends and CPU cores")
    p.set_defaults(func=cmd_info)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    from gpupar.devices import pick_device
    from gpupar.run import train_from_config
    from gpupar.topology import Topology

    train_from_config(cfg, Topology.single(pick_device(cfg.train.device)))
    return 0


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

    from gpupar.sweep import grid, parse_list, parse_seeds, run_sweep, table, write_outputs
    from gpupar.topology import launched_by_torchrun

    cfg = config_from_args(args)
    if "data.val_fraction" not in vars(args) and cfg.data.val_fraction == 0.0:
        cfg.data.val_fraction = 0.2  # a sweep ranks its models by validation loss
    members = grid(parse_seeds(args.seeds), parse_list(args.sweep_lr, float, "--lr") if args.sweep_lr else
                   [cfg.optim.lr], parse_list(args.sweep_hidden, int, "--hidden") if args.sweep_hidden else
                   [cfg.model.hidden])
    if args.max_fused is not None and args.max_fused < 1:
        raise UsageError(f"--max-fused {args.max_fused} must be a positive integer")
    run_dir = Path(cfg.train.run_dir or Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    cfg.train.run_dir = str(run_dir)
    if (cfg.parallel.nproc_per_node or 1) > 1 and not launched_by_torchrun():
        _launch_sweep(cfg, args, run_dir)
        return 0
    topo = _sweep_topology(cfg)
    try:
        sweep = run_sweep(cfg, members, topo, args.max_fused, log=print if topo.is_main else lambda _: None)
        if topo.is_main:
            print(table(sweep.results))
            write_outputs(sweep, cfg, run_dir, args.export_best)
            b = sweep.best.member
            print(f"{len(sweep.results)} models in {sweep.chunks} fused chunk(s), {sweep.wall_time:.2f} s on "
                  f"{topo.device}; best: model {b.index} (seed {b.seed}, lr {b.lr:g}, hidden {b.hidden})")
            print(f"Saved sweep to {run_dir}/ (sweep.jsonl, best.json, best/model.safetensors)"
                  + (f"; best model exported to {args.export_best}" if args.export_best else ""))
    finally:
        if hasattr(topo, "close"):
            topo.close()
    return 0


def _sweep_topology(cfg: Config):
    from gpupar.devices import pick_device
    from gpupar.topology import Topology, launched_by_torchrun

    if not launched_by_torchrun():
        return Topology.single(pick_device(cfg.train.device))
    if not hasattr(Topology, "from_env"):
        raise UsageError("gpupar sweep was started by torchrun, but this build has no Topology.from_env to join "
                         "the ranks (it comes with gpupar.launch)")
    return Topology.from_env(cfg)


def _launch_sweep(cfg: Config, args: argparse.Namespace, run_dir) -> None:
    """Start `gpupar sweep` on every rank with the effective config; each trains its slice."""
    try:
        from gpupar.launch import run_workers
    except ImportError:
        raise UsageError(f"--nproc-per-node {cfg.parallel.nproc_per_node} needs gpupar.launch, which this build "
                         "does not have yet; run without --nproc-per-node (one process)") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "launch.toml").write_text(to_toml(cfg))
    forwarded = ["sweep", "--config", str(run_dir / "launch.toml"), "--seeds", args.seeds]
    for flag_name, value in (("--lr", args.sweep_lr), ("--hidden", args.sweep_hidden),
                             ("--max-fused", args.max_fused), ("--export-best", args.export_best)):
        if value is not None:
            forwarded += [flag_name, str(value)]
    run_workers(cfg, forwarded)


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
        return args.func(args)
    except UsageError as exc:
        print(f"gpupar: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"gpupar: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpupar: interrupted", file=sys.stderr)
        return 130


def _require_torch() -> None:
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        raise UsageError(f"torch {torch.__version__} is too old; gpupar needs torch>=2.6 "
                         "(safe weights_only loading and FSDP2)")
