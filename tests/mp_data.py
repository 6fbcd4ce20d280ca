"""Which samples each rank trains on, for every data source, under torchrun with 2 ranks.

tests/test_data_ranks.py starts this once and reads "OK <name>" lines. Each sample carries
its index in column 0, and the model records, at every forward, the indices it was given.
Each source is trained for 2 epochs on one device (in this process, no process group) and
under ddp on 2 ranks; then, per micro-batch, rank 0's rows followed by rank 1's must be the
single-device micro-batch exactly (so the shards are disjoint and make the same global
batch), and each epoch must hold every sample once (less the stream's stated remainder).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import gpupar
from gpupar.data import synthetic_regression

N, FEATURES = 100, 3
gen = torch.Generator().manual_seed(5)
X = torch.cat([torch.arange(N, dtype=torch.float32)[:, None], torch.rand(N, FEATURES, generator=gen)], dim=1)
Y = X[:, 1:].sum(dim=1, keepdim=True)


class Pairs(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": X[i], "y": Y[i]}


class Classic(Dataset):
    """The classic example's data (1000 samples, 10 features) as dict items, lazily indexed."""

    def __init__(self):
        self.x, self.y = synthetic_regression()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def classic_loader():
    """``--data mp_data:classic_loader``: what a training script brings (test_ddp's and test_fsdp's
    verify runs): a shuffling DataLoader of dict items with 2 workers; its batch of 200 is global."""
    return DataLoader(Classic(), batch_size=200, shuffle=True, num_workers=2, drop_last=True)


class Stream(IterableDataset):
    """A generator of samples, no __len__."""

    def __iter__(self):
        for i in range(N):
            yield X[i], Y[i]


class SizedStream(Stream):
    def __len__(self):
        return N


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(FEATURES, 1)
        self.seen: list[list[int]] = []

    def forward(self, x):
        self.seen.append(x[:, 0].long().tolist())
        return self.fc(x[:, 1:])


def train(data, strategy, batch, grad_accum=1, shuffle=False):
    cfg = gpupar.Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum = 2, batch, grad_accum
    cfg.train.progress, cfg.train.log_every, cfg.data.shuffle = False, 1, shuffle
    if strategy:
        cfg.parallel.strategy = strategy
    model = Recorder()
    result = gpupar.train(model, data, config=cfg)
    return model.seen, result.model.state_dict()


def check(name, make, batch, grad_accum=1, shuffle=False, left=0):
    single, single_state = train(make(), None, batch, grad_accum, shuffle)
    mine, state = train(make(), "ddp", batch, grad_accum, shuffle)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    assert len(single) == len(every[0]) == len(every[1]), (name, len(single), [len(e) for e in every])
    for k, micro in enumerate(single):
        assert every[0][k] + every[1][k] == micro, (name, k, micro, every[0][k], every[1][k])
        assert len(every[0][k]) == len(every[1][k]) == batch // grad_accum // 2
    per_epoch = len(single) // 2
    epochs = [sorted(i for micro in single[e * per_epoch:(e + 1) * per_epoch] for i in micro) for e in range(2)]
    for e, rows in enumerate(epochs):
        assert rows == sorted(set(rows)), (name, e, "a sample seen twice")
        assert rows == list(range(N - left)) if not shuffle else len(rows) == N - left, (name, e, rows)
    if shuffle:
        first = [i for micro in single[:per_epoch] for i in micro]
        second = [i for micro in single[per_epoch:] for i in micro]
        assert first != second, (name, "the seeded shuffle gives each epoch its own order")
    # Same global batches: the weights agree up to the summation order of the two ranks' means.
    for key in single_state:
        torch.testing.assert_close(state[key], single_state[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    if dist.get_rank() == 0:
        print(f"\nOK {name}", flush=True)  # a line of its own, even after a peer's partial line


def main():
    check("map-style", Pairs, batch=20)
    check("loader-workers", lambda: DataLoader(Pairs(), batch_size=20, shuffle=True, num_workers=2), batch=20,
          shuffle=True)
    check("iterable", Stream, batch=24, left=4)  # 100 = 4 x 24 + 4: the last 4 are said, not trained
    check("iterable-sized-accum", SizedStream, batch=20, grad_accum=2)
    check("iterable-loader-workers", lambda: DataLoader(Stream(), batch_size=20, num_workers=2), batch=20,
          grad_accum=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
