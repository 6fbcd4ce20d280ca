"""Batched inference with saved weights, data-parallel across ranks, output in input order."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
import torch.distributed as dist

from gpupar.weights import load_into, load_weights
from gpupar.config import Config, load_toml
from gpupar.data import load_file
from gpupar.errors import UsageError
from gpupar.models import build_model
from gpupar.topology import Topology


def model_config_for(weights: Path) -> Config:
    """The config saved beside the weights (RUN/config.toml), so the same architecture is rebuilt."""
    saved = weights.parent / "config.toml"
    return load_toml(saved) if saved.is_file() else Config()


def predict_rows(weights: str, data: str, topo: Topology, batch_size: int = 4096,
                 cfg: Config | None = None) -> torch.Tensor | None:
    """Predictions for every row of ``data``; rank 0 gets them all in input order, others None.

    Each rank predicts one contiguous block of rows (``tensor_split``: sizes differ by at most
    one), and rank 0 concatenates the blocks in rank order, which is the input order.
    """
    path = Path(weights)
    state = load_weights(path)
    cfg = cfg or model_config_for(path)
    X, _ = load_file(data, cfg.data.target, need_target=False)
    out_features = _out_features(state)
    model = build_model(cfg.model, X.shape[1], out_features, cfg.train.seed)
    load_into(model, state, f"--weights {weights}")
    model = model.to(topo.device).eval()

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


def _out_features(state: dict[str, torch.Tensor]) -> int:
    """The output width: rows of the last 2-D weight (the final Linear layer of the built-ins)."""
    matrices = [v for k, v in state.items() if v.dim() == 2 and k.endswith("weight")]
    if not matrices:
        raise UsageError("--weights: no Linear weight found to infer the output width")
    return matrices[-1].shape[0]


def write_predictions(preds: torch.Tensor, out: str, task: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        if task == "classification":
            writer.writerow(["class"])
            writer.writerows([[int(c)] for c in preds.argmax(dim=1).tolist()])
        else:
            writer.writerow(["prediction"] if preds.shape[1] == 1 else
                            [f"prediction_{i}" for i in range(preds.shape[1])])
            writer.writerows([[repr(float(v)) for v in row] for row in preds.tolist()])


def main(cfg: Config, weights: str, data: str, out: str, batch_size: int) -> None:
    """`gpupar predict`: here, or data-parallel over the ranks --nproc-per-node starts (each
    predicts a block of rows, rank 0 writes them all in input order)."""
    from gpupar import launch
    from gpupar.topology import ParallelDims

    ranks = cfg.parallel.nproc_per_node or 1
    if ranks > 1 and not launch.launched_by_torchrun():
        launch.run_workers(cfg, ["predict", "--weights", weights, "--data", data, "--out", out,
                                 "--batch-size", str(batch_size), "--nproc-per-node", str(ranks),
                                 "--timeout", str(cfg.parallel.timeout)])
        print(f"Wrote predictions to {out}")
        return
    topo = launch.this_process(cfg, ParallelDims(dp_replicate=int(os.environ.get("WORLD_SIZE", 1))))
    saved = model_config_for(Path(weights))
    preds = predict_rows(weights, data, topo, batch_size, saved)
    if topo.is_main:
        write_predictions(preds, out, saved.data.task)
        if not topo.distributed:
            print(f"Wrote {len(preds)} predictions to {out}")
    topo.close()

