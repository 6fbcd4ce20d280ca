"""Config files: TOML read onto a Config (unknown keys and wrong types are one line each)
and the effective Config written back as TOML that reads back equal.

Apart from config.py so that the dataclasses and their checks stay one file a reader can
hold; every file gpupar writes or reads as TOML goes through here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from gpupar.config import Config, field_type, sections
from gpupar.errors import UsageError


RETIRED = {"verify": ("band", "no_dropout", "nudge_init", "first_grads"), "train": ("save_step_losses",)}  # now verify's


def merge(cfg: Config, overrides: dict[str, dict[str, Any]], source: str) -> Config:
    """Apply {section: {field: value}} onto cfg, rejecting unknown keys and wrong types."""
    known = dict(sections())
    overrides = _drop_retired(overrides, source)
    for section, values in overrides.items():
        if section not in known or not isinstance(values, dict):
            raise UsageError(f"{source}: unknown section [{section}]; accepted: {', '.join(known)}")
        group = getattr(cfg, section)
        names = {f.name: f for f in dataclasses.fields(group)}
        for key, value in values.items():
            if key not in names:
                raise UsageError(f"{source}: unknown key {section}.{key}; accepted: {', '.join(names)}")
            setattr(group, key, _coerce(value, field_type(names[key]), f"{source}: {section}.{key}"))
    return cfg


def _drop_retired(overrides: dict, source: str) -> dict:
    """The overrides without verify's knobs (earlier config files carry them), noted in one line."""
    dropped = [f"{section}.{key}" for section, keys in RETIRED.items() if isinstance(overrides.get(section), dict)
               for key in overrides[section] if key in keys]
    if dropped:
        print(f"gpupar: note: {source}: {', '.join(dropped)} ignored (gpupar verify's own flags now: "
              "--band, --no-dropout, --nudge-init, --first-grads, --save-step-losses)", file=sys.stderr)
    kept = {s: ({k: v for k, v in vals.items() if f"{s}.{k}" not in dropped} if isinstance(vals, dict) else vals)
            for s, vals in overrides.items()}
    return {s: vals for s, vals in kept.items() if s != "verify" or vals}


def _coerce(value: Any, kind: type, where: str) -> Any:
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where} = {value!r} should be of type {kind.__name__}")
    return value


def load_toml(path: str | Path, cfg: Config | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}); TOML files must be UTF-8") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:  # nesting deep enough to overflow the parser
        raise UsageError(f"--config {path}: invalid TOML ({exc})") from None
    return merge(cfg or Config(), raw, str(path))


def to_toml(cfg: Config) -> str:
    """The effective config as TOML; ``load_toml`` of this text gives back an equal Config.

    Fields that are None are written as comments, because TOML has no null.
    """
    lines: list[str] = []
    for section, _ in sections():
        lines.append(f"[{section}]")
        group = getattr(cfg, section)
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            if value is None:
                lines.append(f"# {f.name} = (unset)  # {f.metadata['help']}")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON's escapes (\\n, \\", \\uXXXX) are TOML's: a newline in --run-dir or a column name reads back
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
