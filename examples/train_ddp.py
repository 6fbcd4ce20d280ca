"""Train your own PyTorch model with a parallel layout from your own script.

    torchrun --nproc-per-node 2 examples/train_ddp.py                   # DDP
    torchrun --nproc-per-node 2 examples/train_ddp.py --strategy fsdp   # or fsdp, tp

Every rank runs this whole script with the same model and data; gpupar.train gives each rank
its slice of every batch and averages gradients. The result is the same as the CLI's
(`gpupar train --strategy ddp --nproc-per-node 2 --model train_ddp:build` with this folder on
PYTHONPATH), weight for weight. Then check it against one device:

    PYTHONPATH=examples gpupar verify --strategy ddp --nproc-per-node 2 --model train_ddp:build
"""

import argparse

import torch
from torch import nn

import gpupar
from gpupar.data import synthetic_regression


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):  # [batch, width] -> [batch, width]
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    """An input layer, a ModuleList of residual blocks and a head."""

    def __init__(self, width: int = 32, blocks: int = 2):
        super().__init__()
        self.inp = nn.Linear(10, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 1)

    def forward(self, x):  # [batch, 10] -> [batch, 1]
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build() -> nn.Module:
    """The same initial weights on every rank (and for the CLI's --model train_ddp:build)."""
    torch.manual_seed(0)
    return Net()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp", "tp"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=None, help="save the trained weights here (.safetensors, rank 0)")
    args = parser.parse_args()

    X, y = synthetic_regression(1000, 10, 0.1, 42)  # the CLI's synthetic data with its defaults
    cfg = gpupar.Config()
    cfg.parallel.strategy, cfg.train.epochs, cfg.train.log_every = args.strategy, args.epochs, 5
    result = gpupar.train(build(), (X, y), config=cfg)

    state = result.model.state_dict()  # DDP: the whole model on every rank
    if args.strategy == "ddp" and args.out and torch.distributed.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, args.out)
        print(f"final loss {result.history.final_loss:.6f}; saved {args.out}")


if __name__ == "__main__":
    main()
