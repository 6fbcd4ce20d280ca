"""A user's own loop that uses every verb of ``gpupar.setup`` (tests/test_own_verbs.py runs it):

    gpupar run --nproc-per-node 2 --strategy fsdp tests/own_verbs.py OUT [--accum 2] [--epochs 1] [--resume CKPT]

A ModuleList model whose two blocks share one weight (under pp the stages each hold a copy),
AdamW with two parameter groups (the head on its own lr, no weight decay),
gradient accumulation under ``gp.no_sync``, ``gp.forward_backward`` (a pipeline's schedule
under ``--strategy pp``), global clipping, a metric summed with ``gp.all_reduce``, and
``gp.save`` / ``gp.load`` of the model, the optimizer and the step. Rank 0 writes what the
loop saw to OUT/record.json and the checkpoint to OUT/ckpt. The script ends without destroying
the process group, as many do; each rank writes OUT/left-RANK at exit, after gpupar's own exit
handler ran (atexit handlers run last-registered first): whether the group was left.
"""

import argparse
import atexit
import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpupar
from user_models import ResidualMLP

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--accum", type=int, default=2, help="micro-batches per step (no_sync on all but the last)")
parser.add_argument("--epochs", type=int, default=1, help="train until this epoch (4 steps each)")
parser.add_argument("--resume", help="a gp.save checkpoint to continue from")
args = parser.parse_args()

if "RANK" in os.environ:
    atexit.register(lambda: (args.out / f"left-{os.environ['RANK']}").write_text(
        str(not torch.distributed.is_initialized())))
torch.manual_seed(0)
gp = gpupar.setup()  # the layout: GPUPAR_STRATEGY, which `gpupar run --strategy` sets
X = torch.randn(64, 10)
y = X[:, :1].sin() + 0.1 * torch.randn(64, 1)
loader = gp.setup_dataloader(DataLoader(TensorDataset(X, y), batch_size=16))  # the global batch
model = ResidualMLP(width=16, blocks=2)
model.blocks[1].up.weight = model.blocks[0].up.weight  # tied across blocks: a pipeline's two stages each hold a copy
body = [p for name, p in model.named_parameters() if not name.startswith("head.")]
optimizer = torch.optim.AdamW([{"params": body, "weight_decay": 0.1},
                               {"params": list(model.head.parameters()), "lr": 3e-3, "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.8, 0.95))
model, optimizer = gp.setup(model, optimizer, example=X[:16])  # a pipeline traces the forward on it
criterion = nn.MSELoss()


def loss_fn(outputs, targets):
    return criterion(outputs, targets) / args.accum  # gradients add up over the micro-batches


state = {"model": model, "optimizer": optimizer, "step": 0}
if args.resume:
    gp.load(args.resume, state)
losses, norms, target_sums, seen = [], [], [], torch.zeros(())
for epoch in range(state["step"] // len(loader), args.epochs):
    for inputs, targets in loader:
        micro = list(zip(inputs.chunk(args.accum), targets.chunk(args.accum)))
        loss = 0.0
        for i, batch in enumerate(micro):
            # The gradients are reduced once, on the last micro-batch.
            with gp.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext():
                loss = loss + gp.forward_backward(model, batch, loss_fn)
        norms.append(gp.clip_grad_norm_(model, 0.5))
        optimizer.step()
        optimizer.zero_grad()
        state["step"] += 1
        losses.append(loss)
        target_sums.append(gp.all_reduce(targets.sum(), "sum"))  # the global batch's, on every layout
        seen += gp.all_reduce(torch.tensor(float(len(targets))), "sum")
    gp.print(f"epoch {epoch + 1}: loss {float(loss):.4f}")

gp.save(args.out / "ckpt", state)
if gp.rank == 0:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    record = {"losses": [float(v) for v in losses], "norms": [float(v) for v in norms],
              "target_sums": [float(v) for v in target_sums], "seen": float(seen), "step": state["step"],
              "optimizer": type(optimizer).__name__, "groups": groups,
              "sharded": [type(p).__name__ for g in optimizer.param_groups for p in g["params"]]}
    (args.out / "record.json").write_text(json.dumps(record))
