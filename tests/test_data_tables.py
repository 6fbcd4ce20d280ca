"""A Hugging Face ``datasets`` table from local files (extra: data): a ``save_to_disk``
directory and a .jsonl read through ``datasets`` train the weights the same samples give as
an .npz of tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_weights

from gpupar.config import Config
from gpupar.data.sources import first_samples, load_data
from gpupar.errors import UsageError
from harness import gpupar

datasets = pytest.importorskip("datasets")


def _rows():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g)
    y = X @ torch.tensor([[1.0], [2.0], [3.0]])
    return X, y, [{"x": X[i].tolist(), "y": y[i].tolist()} for i in range(64)]


def test_tables_from_local_files_train_as_the_tensors_do(tmp_path):
    X, y, rows = _rows()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "dsdir"))
    np.savez(tmp_path / "d.npz", X=X.numpy(), y=y.numpy())
    cfg = Config()
    for source in ("d.jsonl", "dsdir"):
        cfg.data.data = str(tmp_path / source)
        table = load_data(cfg)
        assert isinstance(table, datasets.Dataset) and len(table) == 64
        batch = first_samples(table)
        torch.testing.assert_close(batch["x"].float(), X[:2])
    cfg.data.data = str(tmp_path / "empty_dir")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UsageError, match="datasets could not read it"):
        load_data(cfg)
    weights = {}
    for source in ("d.jsonl", "d.npz"):
        done, _ = gpupar("train", "--data", source, "--batch-size", "16", "--max-steps", "6", "--run-dir",
                         f"run-{source}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        weights[source] = load_weights(tmp_path / f"run-{source}" / "model.safetensors")
    # The same samples in the same order: equal up to float32 rounding of the parsed values.
    for name, w in weights["d.npz"].items():
        torch.testing.assert_close(weights["d.jsonl"][name], w, rtol=1e-5, atol=1e-6)
