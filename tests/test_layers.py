"""The house's floors: every module of gpupar/ sits on a numbered layer and imports, lazy
imports and ``TYPE_CHECKING`` ones included, only from its own layer or a lower one, and the
import graph has no cycle. Both are read from the source with ``ast``; nothing is imported.

The layers are README.md's Layout section; a new module must be given one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "gpupar"

# Lowest first. A module is named by its dotted path below gpupar; a package's __init__ by the package.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("config", "config_file", "errors", "devices", "weights", "safe_dcp", "run", "run.rundir", "run.files",
        "run.saving"),
    1: ("topology", "models", "models.spec", "models.builtin", "models.gpt", "models.hf", "models.hf_pipeline", "models.outputs", "data",
        "data.files", "data.samples", "data.stream", "data.sources", "data.tokens", "memory", "tracking",
        "measure", "measure.flops", "launch.elastic", "launch.collectives"),
    2: ("parallelize", "parallel", "parallel.activation_checkpoint", "parallel.clip", "parallel.ddp", "parallel.fsdp",
        "parallel.layer_split", "parallel.pipeline", "parallel.pipeline_state", "parallel.pipeline_eval",
        "parallel.pipeline_scaler", "parallel.sync_bn", "parallel.tensor", "parallel.tied", "training.step"),
    3: ("training", "training.state", "training.recipe", "training.finite", "training.graphs", "training.loop",
        "checkpoint"),
    4: ("problem", "job"),
    5: ("plan", "plan.memory", "plan.buffers", "plan.probe", "plan.dispatch", "plan.schedules"),
    6: ("launch",),
    7: ("parity", "parity.harness", "parity.verdict", "parity.noise", "bench", "bench.driver", "bench.worker",
        "bench.peers", "bench.report", "sweep", "sweep.grid", "sweep.fused", "predict", "export", "notebook", "runs",
        "ownloop", "ownloop.env", "ownloop.shard", "ownloop.record", "ownloop.store", "ownloop.script", "ownloop.parity"),
    8: ("cli", "flags", "api", "__init__", "__main__"),
}
LAYER = {name: level for level, names in LAYERS.items() for name in names}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts == ("__init__",):
        return "__init__"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the gpupar modules it imports (``from gpupar.x import name`` names module
    x.name where that is a module, else x; ``from gpupar import x`` names x, or the package)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [_short(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[:len(here) - (node.level - 1)]
                    base = ".".join(["gpupar", *up, *([base] if base else [])])
                submodules = [_short(f"{base}.{a.name}") for a in node.names]
                targets = [t for t in submodules if t in files] or [_short(base)]
            else:
                continue
            edges.update(t for t in targets if t in files)
        edges.discard(name)
        graph[name] = edges
    return graph


def _short(dotted: str) -> str | None:
    """gpupar.x.y -> x.y; gpupar -> __init__; None outside gpupar."""
    if dotted == "gpupar":
        return "__init__"
    return dotted[len("gpupar."):] if dotted.startswith("gpupar.") else None


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
            for a, targets in sorted(graph.items()) for b in sorted(targets) if LAYER[b] > LAYER[a]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(import_graph()) - set(LAYER))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_imports_point_down_only():
    assert upward_edges(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: a lazy import of the orchestrator from the loop is caught."""
    for path in ROOT.rglob("*.py"):
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    loop = tmp_path / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _bad():\n    from gpupar.launch import run\n")
    graph = import_graph(tmp_path)
    assert "training.loop (layer 3) imports launch (layer 6)" in upward_edges(graph)
    assert ["launch", "training.loop"] not in cycles(graph)  # upward, not yet circular


def test_no_file_over_400_lines_nor_function_over_80():
    long_files, long_functions = [], []
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long_files == []
    assert long_functions == []
