"""gpupar.train on a map-style Dataset through a DataLoader with 2 workers, against the
hand-written DataLoader loop on the same data (issue 22: the input pipeline costs nothing).

Both sides get the same DataLoader (batch 64, shuffle, 2 workers, drop_last) over the same
lazily built Dataset, whose items cost real work to make (a small "decode" per sample), and
train the same MLP with Adam for the same epochs. The hand-written loop is what a training
script does: ``for x, y in loader``, forward, loss, zero_grad, backward, step; gpupar keeps
the loader's dataset, collate_fn and workers and plans the (same-sized) batches itself.
Both run in this process, interleaved (the order alternates every repeat, so drift cancels);
min and median of each side and their ratios are printed, with the load average at start
and end and a paste-ready BENCHMARKS.md row. Target: gpupar / hand-written <= 1.02.

    python benchmarks/input_pipeline.py [--repeats 11] [--samples 8192] [--epochs 2] [--threads 1]
"""

import argparse
import contextlib
import io
import os
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gpupar
from gpupar.config import Config

FEATURES, BATCH, WORKERS = 32, 64, 2


class Decoded(Dataset):
    """Samples made on access, as a decoder or a tokenizer makes them: a seeded draw, then a
    little arithmetic (tens of microseconds a sample), never held as one tensor."""

    def __init__(self, samples: int):
        self.samples = samples

    def __len__(self):
        return self.samples

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        raw = torch.rand(FEATURES, 8, generator=gen)
        x = (raw.cumsum(dim=1)[:, -1] / 8).sin()  # [FEATURES]
        return x, x.sum(dim=0, keepdim=True)  # y [1]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def make_loader(samples: int) -> DataLoader:
    return DataLoader(Decoded(samples), batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True)


def hand_written(samples: int, epochs: int) -> nn.Module:
    """The training script's loop over its DataLoader."""
    model, loader = make_model(), make_loader(samples)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"Epoch [{epoch + 1}/{epochs}], Loss: {loss.item():.4f}")
    return model


def with_gpupar(samples: int, epochs: int) -> nn.Module:
    cfg = Config()
    cfg.train.epochs, cfg.train.progress, cfg.train.log_every, cfg.optim.lr = epochs, False, 1, 1e-3
    cfg.optim.optimizer_impl = "default"  # torch's own Adam, as the hand-written loop: only the data path differs
    return gpupar.train(make_model(), make_loader(samples), config=cfg).model


def timed(fn, samples: int, epochs: int) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        fn(samples, epochs)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process, both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    for _ in range(2):  # warm-up: allocator, lazy imports, the first worker start
        timed(hand_written, args.samples, 1), timed(with_gpupar, args.samples, 1)
    plain, ours = [], []
    for i in range(args.repeats):
        sides = [(hand_written, plain), (with_gpupar, ours)]
        for fn, times in sides if i % 2 == 0 else sides[::-1]:
            times.append(timed(fn, args.samples, args.epochs))
    load = f"{load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    p, o = statistics.median(plain), statistics.median(ours)
    steps = args.samples // BATCH * args.epochs
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}  {WORKERS} workers  "
          f"{steps} steps of {BATCH} per run")
    print(f"hand-written DataLoader loop: min {min(plain):.3f} s  median {p:.3f} s per run")
    print(f"gpupar.train(DataLoader):     min {min(ours):.3f} s  median {o:.3f} s per run")
    print(f"ratio gpupar / hand-written = {o / p:.3f} (medians), {min(ours) / min(plain):.3f} (mins)  "
          "(target <= 1.02)")
    print(f"load average (1 min) {load}")
    print("| command | hand-written min / median (s) | gpupar min / median (s) | ratio (medians) | ratio (mins) "
          "| load |")
    print(f"| `python benchmarks/input_pipeline.py --repeats {args.repeats} --samples {args.samples} --epochs "
          f"{args.epochs} --threads {args.threads}` | {min(plain):.3f} / {p:.3f} | {min(ours):.3f} / {o:.3f} | "
          f"{o / p:.3f} | {min(ours) / min(plain):.3f} | {load} |")


if __name__ == "__main__":
    main()
