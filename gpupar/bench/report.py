"""`gpupar bench` outputs: bench.json, report.md (tables) and PNG plots (matplotlib).

matplotlib is optional (``pip install 'gpupar[bench]'``) and imported only to draw.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpupar.errors import UsageError
from gpupar.run.files import atomic_write, atomic_write_text


def write_outputs(summary: dict, out: Path) -> list[Path]:
    """bench.json, report.md and the plots under ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(summary, indent=2) + "\n")  # never through a link
    atomic_write_text(out / "report.md", markdown(summary))
    return [out / "bench.json", out / "report.md", *plots(summary, out)]


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    """A heading with the command and machine, the strategy table, and the peers' table."""
    env = summary["environment"]
    devices = ", ".join(sorted(set(env["devices"]))) or f"{env['cpu_cores']}-core CPU ({env['cpu_model']})"
    memory_kind = next((r["memory_kind"] for r in summary["results"] if "memory_kind" in r), "peak memory")
    tokens = summary["seq_len"] is not None
    lines = [
        f"Command: `{env['command']}`",
        "",
        f"Machine: {devices}, torch {env['torch']}, Python {env['python']}; date {env['date']}. "
        f"Model {summary['model']}, global batch {summary['global_batch']}, {summary['precision']}, "
        f"median of {summary['steps']} steps after {summary['warmup']} warm-up. "
        f"Model FLOPs per step {summary['flops_per_step']:.3g} (forward + backward). " +
        (f"MFU peak: {env['peak_source']}. " if env["peak_tflops_per_device"] is None else
         f"MFU peak: {env['peak_tflops_per_device']:.3g} TFLOP/s per device ({env['peak_source']}). ") +
        f"Memory: {memory_kind}, largest rank.",
        "",
        "| strategy | world | median step (ms) | samples/s" + (" | tokens/s" if tokens else "") +
        " | scaling eff. | TFLOP/s | MFU | memory/rank (MiB) | note |",
        "|---|---:|---:|---:|" + ("---:|" if tokens else "") + "---:|---:|---:|---:|---|",
    ]
    for r in summary["results"]:
        if "skipped" in r:
            blanks = " | ".join(["–"] * (7 if tokens else 6))
            lines.append(f"| {r['strategy']} | {r['world_size']} | {blanks} | skipped: {_cell(r['skipped'])} |")
            continue
        cells = [r["strategy"], str(r["world_size"]), f"{r['median_step_s'] * 1e3:.2f}",
                 f"{r['samples_per_s']:,.0f}"]
        if tokens:
            cells.append(f"{r['tokens_per_s']:,.0f}")
        cells += [_fmt(r.get("scaling_efficiency"), ".2f"), f"{r['achieved_tflops']:.3g}",
                  _fmt(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f") + ("%" if r["mfu"] is not None else ""),
                  f"{r['peak_memory_per_rank_mib']:,.0f}", f"vs {r['baseline']}" if "baseline" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["peers"]:
        lines += ["", "Peers: the same DDP workload (model, global batch, optimizer, loss), median step time.", "",
                  "| framework | world | median step (ms) | samples/s | step / gpupar ddp | step / raw torch | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in summary["peers"]:
            if "skipped" in r:
                lines.append(f"| {r['framework']} | {r['world_size']} | – | – | – | – | skipped: {_cell(r['skipped'])} |")
                continue
            lines.append(f"| {r['framework']} | {r['world_size']} | {r['median_step_s'] * 1e3:.2f} | "
                         f"{r['samples_per_s']:,.0f} | {_fmt(r.get('step_vs_gpupar'), '.3f')} | "
                         f"{_fmt(r.get('step_vs_raw_torch'), '.3f')} | |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def plots(summary: dict, out: Path) -> list[Path]:
    """throughput.png (samples/s against world size, per strategy, with ideal scaling) and
    memory.png (largest rank's peak memory per strategy and world size)."""
    plt = _pyplot()
    ok = [r for r in summary["results"] if "skipped" not in r]
    strategies = list(dict.fromkeys(r["strategy"] for r in ok))  # skipped ones have nothing to draw
    worlds = sorted({r["world_size"] for r in ok}) or [1]
    unit = "tokens/s" if summary["seq_len"] else "samples/s"
    key = "tokens_per_s" if summary["seq_len"] else "samples_per_s"
    where = f"{summary['model']}, global batch {summary['global_batch']}, {summary['environment']['device_type']}"
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for strategy in strategies:
        points = sorted((r["world_size"], r[key]) for r in ok if r["strategy"] == strategy)
        if points:
            ax.plot(*zip(*points), marker="o", label=strategy)
    base = next((r[key] for r in ok if r["world_size"] == 1), None)
    if base is not None and len(worlds) > 1:
        ax.plot(worlds, [base * w for w in worlds], linestyle="--", color="grey", label="ideal (linear)")
    ax.set_xticks(worlds)
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel(f"throughput ({unit})")
    ax.set_title(f"Throughput vs world size\n{where}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "throughput.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append(out / "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        points = sorted((r["world_size"], r["peak_memory_per_rank_mib"]) for r in ok if r["strategy"] == strategy)
        if points:
            xs = [worlds.index(w) + (i - (len(strategies) - 1) / 2) * width for w, _ in points]
            ax.bar(xs, [m for _, m in points], width, label=strategy)
    ax.set_xticks(range(len(worlds)), [str(w) for w in worlds])
    ax.set_xlabel("world size (ranks)")
    kind = next((r["memory_kind"] for r in ok), "peak memory")
    ax.set_ylabel(f"{kind} per rank (MiB)")
    ax.set_title(f"Per-rank memory (largest rank)\n{where}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    atomic_write(out / "memory.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append(out / "memory.png")
    return written


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("gpupar bench draws its plots with matplotlib, which is not installed; "
                         "pip install 'gpupar[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def update_markdown(path: Path, label: str, report: str) -> None:
    """Replace the block between ``<!-- gpupar bench: LABEL -->`` and ``<!-- end gpupar bench: LABEL -->``
    in ``path`` with ``report`` (appending the block when absent)."""
    begin, end = f"<!-- gpupar bench: {label} -->", f"<!-- end gpupar bench: {label} -->"
    block = f"{begin}\n{report.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
