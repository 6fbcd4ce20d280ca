"""Command-line flags built from the config dataclasses, and one-line errors for bad ones.

Config flags are generated from the dataclasses in config.py, so every field is a flag
with its help text. Only flags given on the command line override the TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Sequence

from gpupar.config import Config, field_type, flag, sections
from gpupar.config_file import load_toml, merge
from gpupar.errors import UsageError


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


def number(kind: type) -> Callable[[str], Any]:
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
                kwargs.update(type=number(kind), metavar=kind.__name__.upper())
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


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--seeds", default="0", help="weight-init seeds: ranges and lists, like 0-63 or 1,2,5 (default: 0)")
    g.add_argument("--lr", dest="sweep_lr", metavar="LR,...", help="learning rates, like 0.001,0.01,0.1 (default: 0.01)")
    g.add_argument("--hidden", dest="sweep_hidden", metavar="H,...", help="hidden widths, like 32,50,64 (default: 50)")
    g.add_argument("--max-fused", type=number(int), metavar="K", help="at most K models per fused chunk")
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
        g.add_argument(*flags, dest=dest, type=number(int) if kind is int else str, default=argparse.SUPPRESS,
                       help=help_text)
    g.add_argument("--overwrite", dest="train.overwrite", type=parse_bool, nargs="?", const=True,
                   metavar="true|false", default=argparse.SUPPRESS,
                   help="replace the run or sweep already in --run-dir (kept aside until this sweep succeeds)")


def add_verify_flags(p: argparse.ArgumentParser) -> None:
    """verify's own knobs (``verify.harness.VerifyOptions``): flags of `gpupar verify` only."""
    g = p.add_argument_group("verify")
    g.add_argument("--rtol", type=number(float), default=None,
                   help="relative tolerance for losses and parameters, with no noise reference "
                        "(default: calibrated against rounding noise)")
    g.add_argument("--band", type=number(float), default=10.0,
                   help="every step's gap must stay within this factor of the run's own rounding noise (or the "
                        "fixed floor: 1e-5 fp32, 1e-4 with --tp, 2e-2 bf16/fp16) (default: 10.0)")
    for name, default, help_text in (
            ("--no-dropout", False, "set p=0 in every dropout layer, in every run (a dropout mask cannot match "
                                    "across a different batch split)"),
            ("--nudge-init", True, "train the rounding-noise reference, whose initial weights are one ulp off; "
                                   "false judges with the fixed tolerance"),
            ("--first-grads", True, "record and compare the whole model's step-1 gradients "
                                    "(first_grads.safetensors in each run)"),
            ("--save-step-losses", True, "keep every run's step_losses.json after the verdict")):
        g.add_argument(name, type=parse_bool, nargs="?", const=True, default=default, metavar="true|false",
                       help=f"{help_text} (default: {str(default).lower()})")
