"""Batched inference with saved weights, data-parallel across ranks, output in input order."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.distributed as dist

from gpupar.weights import load_into, load_weights
from gpupar.config import Config
from gpupar.config_file import load_toml
from gpupar.data import load_file
from gpupar.errors import UsageError, first_line
from gpupar.run.files import atomic_write, check_not_input, check_out_path
from gpupar.run.rundir import check_not_run_file
from gpupar.models import build_model
from gpupar.models.builtin import BUILTIN
from gpupar.models.hf import is_hf
from gpupar.topology import Topology


def model_config_for(weights: Path, model: str | None = None) -> Config:
    """The config saved beside the weights (RUN/config.toml), so the same architecture is rebuilt.

    A run directory is someone else's file: its config builds only the built-in models
    (simple-nn, mlp, gpt, hf:...). A user factory is code, so it is imported only when
    ``--model`` names it on this command line.
    """
    saved = weights.parent / "config.toml"
    cfg = load_toml(saved) if saved.is_file() else Config()
    if model is not None:
        cfg.model.name = model
    elif cfg.model.name not in BUILTIN and not is_hf(cfg.model.name):
        raise UsageError(f"--weights {weights}: {saved} names the model factory {cfg.model.name!r}; gpupar builds "
                         "only built-in models from a run's files. Pass --model " + cfg.model.name +
                         " to import and call it")
    return cfg.validate()


def check_request(out: str, batch_size: int, weights: str | None = None, data: str | None = None) -> None:
    """The flags that decide what is written, checked before anything is read or written:
    a bad one must not leave an empty or truncated file over an existing one, and the
    output is neither an input (the same file by inode) nor a file of a run."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be a positive integer (rows per forward pass)")
    check_out_path(out, "--out")
    inputs = {"--weights": weights, "--data": data}
    check_not_input(out, "--out", {k: v for k, v in inputs.items() if v})
    if weights:
        check_not_input(out, "--out", {"the run's config": Path(weights).parent / "config.toml"})
    check_not_run_file(out, "--out")


def predict_rows(weights: str, data: str, topo: Topology, batch_size: int = 4096,
                 cfg: Config | None = None) -> torch.Tensor | None:
    """Predictions for every row of ``data``; rank 0 gets them all in input order, others None.

    Each rank predicts one contiguous block of rows (``tensor_split``: sizes differ by at most
    one), and rank 0 concatenates the blocks in rank order, which is the input order.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be a positive integer (rows per forward pass)")
    model, X, out_features = prepare(weights, data, cfg or model_config_for(Path(weights)))
    model = model.to(topo.device).eval()
    with torch.no_grad():
        try:
            model(X[:1].to(topo.device))
        except RuntimeError as exc:  # a user model that does not take rows of this width
            raise UsageError(f"--data {data}: the model of --weights {weights} does not accept rows of shape "
                             f"{list(X.shape[1:])} ({first_line(exc)})") from None

    block = torch.tensor_split(torch.arange(len(X)), topo.world_size)[topo.rank]
    outputs = []
    with torch.no_grad():
        for start in range(0, len(block), batch_size):
            rows = block[start:start + batch_size]
            outputs.append(model(X[rows].to(topo.device)).float().cpu())  # [rows, out]
    mine = torch.cat(outputs) if outputs else torch.empty(0, out_features)
    if not topo.distributed:
        return mine
    blocks: list = [None] * topo.world_size
    dist.gather_object(mine, blocks if topo.is_main else None, dst=0)
    return torch.cat(blocks) if topo.is_main else None


def prepare(weights: str, data: str, cfg: Config) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """The model with the weights loaded, the rows and the output width; every check of the
    files. The launcher runs it before starting ranks, so a bad file is one line there."""
    state = load_weights(Path(weights))
    X, _ = load_file(data, cfg.data.target, need_target=False)
    out_features = _out_features(state)
    _check_width(X, state, cfg, data, weights)
    model = build_model(cfg.model, X.shape[1], out_features, cfg.train.seed)
    load_into(model, state, f"--weights {weights}")
    if not X.is_floating_point():  # as training took them: cast for a Linear, ids for an embedding
        from gpupar.models.builtin import probe_forward
        from gpupar.problem import integer_features, note_once

        X, _, note = integer_features(X, model, lambda x: probe_forward(model, x))
        if note is not None:
            note_once(f"--data {data}: {note}")
    return model, X, out_features


def _check_width(X: torch.Tensor, state: dict[str, torch.Tensor], cfg: Config, data: str, weights: str) -> None:
    """A built-in model takes its input width from the data, so rows of the wrong width would
    surface as a weight-shape mismatch: blame the data, naming both widths."""
    if cfg.model.name not in ("simple-nn", "mlp"):
        return
    first = next((state[k] for k in layer_order(state) if state[k].dim() == 2 and k.endswith("weight")), None)
    if first is not None and X.dim() == 2 and X.shape[1] != first.shape[1]:
        target = f" after dropping the target {cfg.data.target!r}" if cfg.data.target else ""
        raise UsageError(f"--data {data}: rows have {X.shape[1]} feature columns{target}, but the model in "
                         f"--weights {weights} was trained on {first.shape[1]}")


def layer_order(state: dict[str, torch.Tensor]) -> list[str]:
    """Parameter names in layer order: safetensors sorts them as text, which puts an mlp's
    "10.weight" before "2.weight"; numbers compare as numbers here."""
    return sorted(state, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])


def _out_features(state: dict[str, torch.Tensor]) -> int:
    """The output width: rows of the last 2-D weight (the final Linear layer of the built-ins)."""
    matrices = [state[k] for k in layer_order(state) if state[k].dim() == 2 and k.endswith("weight")]
    if not matrices:
        raise UsageError("--weights: no Linear weight found to infer the output width")
    return matrices[-1].shape[0]


def write_predictions(preds: torch.Tensor, out: str, task: str) -> None:
    """The predictions as CSV, written atomically (an existing file is replaced whole or not at all)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            if task == "classification":
                writer.writerow(["class"])
                writer.writerows([[int(c)] for c in preds.argmax(dim=1).tolist()])
            else:
                writer.writerow(["prediction"] if preds.shape[1] == 1 else
                                [f"prediction_{i}" for i in range(preds.shape[1])])
                writer.writerows([[repr(float(v)) for v in row] for row in preds.tolist()])

    atomic_write(check_out_path(out, "--out"), write)


def main(cfg: Config, weights: str, data: str, out: str, batch_size: int, model: str | None = None) -> None:
    """`gpupar predict`: here, or data-parallel over the ranks --nproc-per-node starts (each
    predicts a block of rows, rank 0 writes them all in input order). ``model``: --model,
    the factory to trust when the run's config names one."""
    from gpupar import launch
    from gpupar.launch.elastic import launched_by_torchrun

    check_request(out, batch_size, weights, data)
    ranks = cfg.parallel.nproc_per_node or 1
    if ranks > 1 and not launched_by_torchrun():  # every file is checked once, before any rank starts
        prepare(weights, data, model_config_for(Path(weights), model))
    extra = ["--weights", weights, "--data", data, "--out", out, "--batch-size", str(batch_size),
             "--nproc-per-node", str(ranks), "--timeout", str(cfg.parallel.timeout)]
    extra += ["--model", model] if model is not None else []
    launch.run(cfg, "predict", lambda topo, _: _predict_here(topo, weights, data, out, batch_size, model), extra,
               replicas=True, claim=False)
    if ranks > 1 and not launched_by_torchrun():
        print(f"Wrote predictions to {out}")


def _predict_here(topo: Topology, weights: str, data: str, out: str, batch_size: int, model: str | None) -> None:
    saved = model_config_for(Path(weights), model)
    preds = predict_rows(weights, data, topo, batch_size, saved)
    if topo.is_main:
        write_predictions(preds, out, saved.data.task)
        if not topo.distributed:
            print(f"Wrote {len(preds)} predictions to {out}")
