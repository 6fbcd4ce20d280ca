"""Past runs: ``gpupar runs`` lists them, ``gpupar report RUN`` plots a run's loss curve.

Both read only what ``gpupar train`` leaves in a run directory: ``summary.json`` (written
when a run finishes), ``config.toml`` (written when it starts) and ``metrics.jsonl`` (one
record per logged epoch). A directory with a config but no summary is a run that failed
or is still going; it is listed with its status instead of figures. A sweep directory
(``best.json``, written when ``gpupar sweep`` finishes) is listed as one row with its best
model's loss. A file that cannot be read marks its run "unreadable" and the others are
still listed: one damaged directory must not hide the rest.
"""

from __future__ import annotations

import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gpupar.errors import UsageError, first_line
from gpupar.run.files import atomic_write, check_out_path


@dataclass
class RunRow:
    name: str  # the run directory, relative to the run root
    date: str  # when it finished (or started, without a summary)
    model: str
    strategy: str
    world_size: str
    final_loss: str
    wall_time: str
    status: str  # finished, "no summary" (failed or still running), "sweep of N models" or "unreadable: ..."


def find_runs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (a directory with config.toml or summary.json)."""
    if not root.is_dir():
        raise UsageError(f"--run-root {root}: no such directory (train something first: gpupar train)")
    dirs = {p.parent for name in ("config.toml", "summary.json", "best.json") for p in root.rglob(name)}
    # best/ inside a sweep (its best model and that model's config) is part of the sweep's row
    return sorted(d for d in dirs if not (d.name == "best" and (d.parent / "best.json").is_file()))


def _started(run_dir: Path) -> float:
    marker = run_dir / "config.toml"
    return (marker if marker.exists() else run_dir).stat().st_mtime


def run_row(run_dir: Path, root: Path) -> RunRow:
    """One run's row; a run whose files cannot be read is a row that says which file and why."""
    try:
        return _sweep_row(run_dir, root) if (run_dir / "best.json").is_file() else _run_row(run_dir, root)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, tomllib.TOMLDecodeError) as exc:
        name = str(run_dir.relative_to(root))
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(run_dir.stat().st_mtime))
        return RunRow(name, date, "?", "?", "-", "-", "-", f"unreadable: {first_line(exc)}")


def _sweep_row(run_dir: Path, root: Path) -> RunRow:
    best = _read_json(run_dir / "best.json")
    config = _read_toml(run_dir / "config.toml")
    loss = best["val_loss"] if best.get("val_loss") is not None else best["train_loss"]
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime((run_dir / "best.json").stat().st_mtime))
    ranks = config.get("parallel", {}).get("nproc_per_node", 1)
    return RunRow(str(run_dir.relative_to(root)), date, str(config.get("model", {}).get("name", "?")), "sweep",
                  str(ranks), f"{float(loss):.4f}", f"{float(best.get('wall_time_s', math.nan)):.2f} s",
                  f"sweep of {best.get('models', '?')} models (best: seed {best.get('seed', '?')}, "
                  f"lr {best.get('lr', '?')}, hidden {best.get('hidden', '?')})")


def _run_row(run_dir: Path, root: Path) -> RunRow:
    summary = _read_json(run_dir / "summary.json")
    config = _read_toml(run_dir / "config.toml")
    model = str(summary.get("model") or config.get("model", {}).get("name", "?"))
    strategy = str(summary.get("strategy") or config.get("parallel", {}).get("strategy", "?"))
    date = summary.get("finished", "").replace("T", " ")[:16] or time.strftime("%Y-%m-%d %H:%M",
                                                                                 time.localtime(_started(run_dir)))
    if not summary:
        return RunRow(str(run_dir.relative_to(root)), date, model, strategy, "-", "-", "-", "no summary")
    loss = float(summary.get("final_loss", math.nan))
    return RunRow(str(run_dir.relative_to(root)), date, model, strategy, str(summary.get("world_size", "?")),
                  f"{loss:.4f}", f"{float(summary.get('wall_time_s', math.nan)):.2f} s", "finished")


def runs_table(root: Path) -> str:
    rows = sorted((run_row(d, root) for d in find_runs(root)), key=lambda r: (r.date, r.name))
    if not rows:
        return f"no runs under {root}/"
    header = RunRow("run", "date", "model", "strategy", "ranks", "final loss", "wall time", "status")
    cells = [list(vars(r).values()) for r in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    numeric = {4, 5, 6}  # right-aligned columns
    return "\n".join("  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in cells)


def read_metrics(run_dir: Path) -> list[dict]:
    """The loss records of ``metrics.jsonl``; lines that cannot be read (a run killed while
    writing leaves a truncated last line) are skipped with a note on stderr, not fatal."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl (is it a gpupar run directory that finished?)")
    records, bad = [], []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            record = "bad"
        if record is None:
            continue
        if not isinstance(record, dict) or ("event" not in record and not _is_loss_record(record)):
            bad.append(number)
        elif "event" not in record:  # per-rank memory rows are not loss records
            records.append(record)
    if not records and bad:  # nothing left to read: one line, the error, says it all
        raise UsageError(f"{path} holds no readable loss records ({len(bad)} unreadable line(s), first: line "
                         f"{bad[0]}): nothing to plot")
    if bad:
        print(f"gpupar: note: skipped {len(bad)} unreadable line(s) of {path} (first: line {bad[0]})",
              file=sys.stderr)
    return records


def _is_loss_record(record: dict) -> bool:
    numbers = (int, float)
    return (isinstance(record.get("step"), numbers) and isinstance(record.get("loss"), numbers)
            and isinstance(record.get("val_loss", 0.0), numbers))


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the training (and validation) loss against the step to ``RUN/loss.png``.

    A log scale for the loss when it spans more than a factor of 20 (the classic example
    falls from ~100 to ~0.07), so the end of the curve is not a flat line.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError("gpupar report needs matplotlib: pip install 'gpupar[plots]'") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if not run_dir.is_dir():
        raise UsageError(f"gpupar report {run_dir}: no such run directory (list them with gpupar runs)")
    out = out or run_dir / "loss.png"
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out {out}: unsupported format {out.suffix or '(no suffix)'!r}; expected .png, .pdf or .svg")
    check_out_path(out, "--out")
    records = read_metrics(run_dir)
    if not records:
        raise UsageError(f"{run_dir}/metrics.jsonl holds no readable loss records: nothing to plot")
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    step_losses = run_dir / "step_losses.json"  # every step, with --save-step-losses
    per_step = _read_json_or_empty(step_losses)
    if isinstance(per_step, list) and per_step and all(isinstance(v, (int, float)) for v in per_step):
        ax.plot(range(1, len(per_step) + 1), per_step, linewidth=1, alpha=0.5, label="training loss (every step)")
    ax.plot(steps, [r["loss"] for r in records], marker="o", linewidth=2,
            label="training loss (mean since the previous point)")
    if any("val_loss" in r for r in records):
        ax.plot([r["step"] for r in records if "val_loss" in r], [r["val_loss"] for r in records if "val_loss" in r],
                marker="s", linewidth=2, linestyle="--", label="validation loss")
    losses = [r[k] for r in records for k in ("loss", "val_loss") if k in r and r[k] > 0]
    if losses and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    summary = _read_json_or_empty(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    title = f"{run_dir.name}: {summary.get('model', '')} ({summary.get('strategy', '')}"
    if "world_size" in summary:
        title += f", {summary['world_size']} rank{'s' if summary['world_size'] != 1 else ''}"
    title += ")"
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("optimizer step", fontsize=12)
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""), fontsize=12)
    ax.tick_params(labelsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=11)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:]))  # never through a symlink
    plt.close(fig)
    return out


def _read_json(path: Path) -> dict:
    """A JSON object, {} when the file is absent; a damaged file raises, naming it."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path.name}: {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} holds a {type(obj).__name__}, not an object")
    return obj


def _read_json_or_empty(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, OSError):
        return {}


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path.name}: {first_line(exc)}") from None


