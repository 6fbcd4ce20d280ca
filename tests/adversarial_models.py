"""Adversarial cases on what the model and the data's dtypes can do: integer features (cast
with one note, ids left to an embedding, a table refused before launch) and model outputs no
loss can take a gradient through (one line before launch). All are fast: no ranks, no signals."""

from __future__ import annotations

import json
from pathlib import Path

from adversarial_kit import HELD, TRAIN, UNCLEAR, case, judge, lines

# --- integer features: cast with a note, or ids left to an embedding ---------------------------


def _integer_features(ctx, data: Path, *extra, note: bool = True):
    r = ctx.run(*TRAIN, "--data", data, *extra, "--run-dir", ctx.dir / "R")
    outcome = judge(r, expect=(0,))
    if outcome[0] != HELD:
        return outcome
    err = lines(r.err)
    if note and (len(err) != 1 or "integer features" not in err[0] or data.name not in err[0]):
        return UNCLEAR, f"expected one note naming {data.name} and its integer features, got {err}"
    return (UNCLEAR, f"ids cast for an embedding: {err}") if not note and err else outcome


@case("late")
def pt_integer_features(ctx):
    import torch

    torch.save({"X": torch.arange(640, dtype=torch.int32).reshape(64, 10), "y": torch.ones(64)}, ctx.dir / "d.pt")
    return _integer_features(ctx, ctx.dir / "d.pt")


@case("late")
def npz_uint8_features(ctx):
    import numpy as np

    with open(ctx.dir / "d.npz", "wb") as fh:
        np.savez(fh, X=(np.arange(640) % 256).astype(np.uint8).reshape(64, 10), y=np.ones(64, np.float32))
    return _integer_features(ctx, ctx.dir / "d.npz", "--model", "mlp")


@case("silent")
def npz_token_ids_with_an_embedding(ctx):
    import numpy as np

    (ctx.dir / "adv_ends.py").write_text(ENDS)
    with open(ctx.dir / "d.npz", "wb") as fh:
        np.savez(fh, X=np.arange(640).reshape(64, 10) % 50, y=np.ones(64, np.float32))
    return _integer_features(ctx, ctx.dir / "d.npz", "--model", "adv_ends:embedding", note=False)


# --- model outputs no loss can take a gradient through: one line before launch ------------------

ENDS = '''
import torch
from torch import nn


class Ends(nn.Linear):  # Linear(10, 1) whose output ends in ``how``
    def __init__(self, how):
        super().__init__(10, 1)
        self.how = how

    def forward(self, x):
        y = super().forward(x)
        if self.how == "complex":
            return torch.complex(y, y)
        if self.how == "no_grad":
            with torch.no_grad():
                return super().forward(x)
        return {"bool": y > 0, "detached": y.detach(), "argmax": torch.cat([y, -y], 1).argmax(1, keepdim=True),
                "own_loss_detached": {"loss": y.sum().detach(), "logits": y}}[self.how]


def embedding():
    return nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(40, 1))
'''

for _how in ("bool", "complex", "no_grad", "detached", "argmax", "own_loss_detached"):
    def _case(ctx, how=_how):
        (ctx.dir / "adv_ends.py").write_text(ENDS + f"\n\ndef model():\n    return Ends({how!r})\n")
        r = ctx.run(*TRAIN, "--model", "adv_ends:model", "--run-dir", ctx.dir / "R")
        return judge(r, needles=["grad"], left=ctx.dir / "R")

    _case.__name__ = f"model_with_{_how}_output"
    case("traceback")(_case)


@case("traceback")
def jsonl_integer_features(ctx):
    """A table is read a batch at a time: integer features a Linear cannot take are one line."""
    rows = [json.dumps({"x": [i % 7] * 10, "y": [float(i % 3)]}) for i in range(64)]
    (ctx.dir / "d.jsonl").write_text("\n".join(rows) + "\n")
    r = ctx.run(*TRAIN, "--data", ctx.dir / "d.jsonl", "--run-dir", ctx.dir / "R")
    return judge(r, needles=["d.jsonl", "int64"], left=ctx.dir / "R")
