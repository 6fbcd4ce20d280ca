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
