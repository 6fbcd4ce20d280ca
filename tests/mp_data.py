"""Which samples each rank trains on, for every data source, under torchrun with 2 ranks.

tests/test_data_ranks.py starts this once and reads "OK <name>" lines. Each sample carries
its index in column 0, and the model records, at every forward, the indices it was given.
Each source is trained for 2 epochs on one device (in this process, no process group) and
under ddp on 2 ranks; then, per micro-batch, rank 0's rows followed by rank 1's must be the
single-device micro-batch exactly (so the shards are disjoint and make the same global
batch), and each epoch must hold every sample once (less the stream's stated remainder).

Resume (``mp_data.py OUT``, then ``mp_data.py OUT resume`` at another world size): a run at
world 2 is interrupted mid-epoch, just after the checkpoint at step STOP (the step after it
is lost, as a crash loses it), and continued from that checkpoint at world 2 here, at world 4
by the second spawn, and on one device by tests/test_data_ranks.py in its own process. Its
first part's micro-batches followed by the resumed part's must be the uninterrupted
single-device run's exactly, and the final weights its weights: each sample once an epoch,
none repeated or skipped at the resume, whatever world size continues.
"""

import json
import os
import sys
from pathlib import Path

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


class Nested(Dataset):
    """((x, mask), y) items: the model is called with two inputs."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return (X[i], torch.ones(FEATURES + 1)), Y[i]


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

    def forward(self, x, mask=None):
        self.seen.append(x[:, 0].long().tolist())
        return self.fc((x if mask is None else x * mask)[:, 1:])


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


class Crash(Exception):
    """Raised from the step hook: the run stops as a killed one would, mid-epoch."""


STOP = 7  # the checkpoint the run is resumed from: epoch 2 (of 5 batches each), batch 2
RESUMABLE = {  # name -> a fresh source; both shuffled or streamed through 2 DataLoader workers
    "loader-workers": lambda: DataLoader(Pairs(), batch_size=20, shuffle=True, num_workers=2),
    "iterable-loader-workers": lambda: DataLoader(Stream(), batch_size=20, num_workers=2),
}


def resumable_run(name, world, run_dir, resume=None):
    """Train RESUMABLE[name] for 2 epochs as `gpupar train` does (fit with a Checkpointer):
    from scratch, saving at STOP and crashing one step later, or from the checkpoint ``resume``.
    Returns this rank's micro-batches up to the crash (or the end) and the final weights."""
    from gpupar.checkpoint import Checkpointer
    from gpupar.data import as_samples
    from gpupar.models import ModelSpec
    from gpupar.parallelize import parallelize
    from gpupar.topology import Topology
    from gpupar.training.loop import Hooks, fit
    from gpupar.training.recipe import make_loss, make_optimizer

    cfg = gpupar.Config()
    cfg.train.epochs, cfg.train.progress, cfg.train.log_every = 2, False, 1
    if world > 1:
        cfg.parallel.strategy = "ddp"
    cfg.checkpoint.checkpoint_every, cfg.checkpoint.resume = (None, str(resume)) if resume else (STOP, None)
    cfg = cfg.validate()
    topo = Topology.from_env(cfg) if world > 1 else Topology.single(torch.device("cpu"))
    model = Recorder()
    train_set, _ = as_samples(RESUMABLE[name](), cfg)
    parallel = parallelize(model, topo, cfg, ModelSpec("user", lambda *_: model))

    def crash(step):
        if resume is None and step == STOP + 1:
            raise Crash

    try:
        fit(parallel, train_set, cfg, topo, make_loss(cfg), make_optimizer(parallel.model, cfg), None,
            Checkpointer(cfg, topo, Path(run_dir), log=lambda _: None), Hooks(log=lambda _: None, on_step=crash))
    except Crash:
        pass
    return model.seen, model.state_dict()


def merged(per_rank):
    """Each micro-batch as the ranks' shards in rank order: the global micro-batch."""
    assert len({len(seen) for seen in per_rank}) == 1, [len(seen) for seen in per_rank]
    return [sum((seen[k] for seen in per_rank), []) for k in range(len(per_rank[0]))]


def check_resumed(name, first, resumed, resumed_state):
    """``first``: the world-2 run's global micro-batches up to its checkpoint; ``resumed``: the
    resumed run's. Together they must be the uninterrupted single-device run, sample for sample."""
    reference, reference_state = train(RESUMABLE[name](), None, 20, shuffle=name == "loader-workers")
    assert first + resumed == reference, (name, len(first), len(resumed), len(reference))
    for epoch in range(2):  # 5 global batches of 20 an epoch: each of the 100 samples once
        assert sorted(sum(reference[epoch * 5:(epoch + 1) * 5], [])) == list(range(N)), (name, epoch)
    # DDP's mean over the ranks' half-batches against one mean: summation order only.
    for key in reference_state:
        torch.testing.assert_close(resumed_state[key], reference_state[key], rtol=1e-5, atol=1e-6,
                                   msg=f"{name}: {key}")


def gathered(seen):
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, seen)
    return merged(every)


def interrupt_and_resume(out: Path):
    """World 2: each resumable source interrupted after STOP, then resumed here at world 2; the
    first part's global micro-batches go to OUT/NAME.json for the other world sizes' checks."""
    for name in RESUMABLE:
        run = out / name
        seen, _ = resumable_run(name, 2, run)
        first = gathered(seen)[:STOP]  # one micro-batch a step; the crashed step is trained again
        if dist.get_rank() == 0:
            (out / f"{name}.json").write_text(json.dumps(first))
        seen, state = resumable_run(name, 2, run / "resumed-2", resume=run / "checkpoints" / f"step-{STOP}")
        check_resumed(name, first, gathered(seen), state)
        if dist.get_rank() == 0:
            print(f"OK resume-2 {name}", flush=True)


def resume_elsewhere(out: Path):
    """Another world size (4 here): continue each source from the world-2 checkpoint."""
    world = int(os.environ["WORLD_SIZE"])  # the process group is joined by the first run
    for name in RESUMABLE:
        first = json.loads((out / f"{name}.json").read_text())
        seen, state = resumable_run(name, world, out / name / f"resumed-{world}",
                                    resume=out / name / "checkpoints" / f"step-{STOP}")
        check_resumed(name, first, gathered(seen), state)
        if dist.get_rank() == 0:
            print(f"OK resume-{world} {name}", flush=True)


def main():
    if dist.is_torchelastic_launched() and os.environ["RANK"] != "0":
        # Every rank's one-device runs log; the ranks share torchrun's stdout pipe, where another
        # rank's block-buffered output can end mid-line and run into rank 0's "OK" line.
        sys.stdout = open(os.devnull, "w")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if out is not None and sys.argv[2:] == ["resume"]:
        resume_elsewhere(out)
        dist.destroy_process_group()
        return
    check("map-style", Pairs, batch=20)
    check("tensors-1d-target", lambda: (X, Y[:, 0]), batch=20)  # y [N]: one output column
    check("nested", Nested, batch=20)
    check("loader-workers", lambda: DataLoader(Pairs(), batch_size=20, shuffle=True, num_workers=2), batch=20,
          shuffle=True)
    check("iterable", Stream, batch=24, left=4)  # 100 = 4 x 24 + 4: the last 4 are said, not trained
    check("iterable-sized-accum", SizedStream, batch=20, grad_accum=2)
    check("iterable-loader-workers", lambda: DataLoader(Stream(), batch_size=20, num_workers=2), batch=20,
          grad_accum=2)
    if out is not None:
        interrupt_and_resume(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
