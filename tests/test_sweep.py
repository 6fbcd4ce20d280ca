"""Fused sweeps: the grid, sharding and chunking, the fused optimizer, exactness against training
each model alone, the vmap fallback, the CLI and the gather across ranks.

Tolerance: 1e-5 relative on losses (fp32). A fused model runs the same arithmetic as the
model alone except that its matrix products are batched (different summation order, ~1e-7
per step); measured drift after 100 Adam steps is ~1e-6, so 1e-5 leaves 10x headroom and
still catches any real mixing of models, a wrong learning rate or a missed step (>= 1e-3).
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import socket

import pytest
import torch
from torch import nn

import gpupar
from gpupar.weights import load_into, load_weights
from gpupar.config import Config
from gpupar.config_file import load_toml
from gpupar.data import synthetic_regression
from gpupar.errors import UsageError
from gpupar.sweep.fused import FusedOptimizer, clip_per_model, fuse, train_step
from gpupar.data import as_samples
from gpupar.models import build_model
from gpupar.sweep import Member, chunks, grid, parse_list, parse_seeds, run_sweep, shard, train_chunk
from gpupar.topology import ParallelDims, Topology

RTOL = 1e-5
CPU = torch.device("cpu")


def test_grid_parsing():
    assert parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_seeds("1,2,5") == [1, 2, 5]
    assert parse_list("0.001,0.1", float, "--lr") == [0.001, 0.1]
    for bad in ("5-1", "a", "1,1", "-3"):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(UsageError, match="--lr '0.1,x'"):
        parse_list("0.1,x", float, "--lr")
    with pytest.raises(UsageError, match="positive"):
        parse_list("0,1", float, "--lr")
    members = grid([0, 1], [0.1, 0.01], [32, 64])
    assert len(members) == 8 and [m.index for m in members] == list(range(8))
    assert {(m.seed, m.lr, m.hidden) for m in members} == {(s, lr, h) for s in (0, 1) for lr in (0.1, 0.01)
                                                        for h in (32, 64)}


def test_shard_and_chunks():
    members = grid(list(range(10)), [0.1], [32, 64])  # 20 models
    for world in (1, 2, 3, 7):
        parts = [shard(members, r, world) for r in range(world)]
        assert [m for p in parts for m in p] == members  # contiguous blocks, in order, all covered
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    groups = chunks(members, 4)
    assert all(len(g) <= 4 and len({m.hidden for m in g}) == 1 for g in groups)
    assert sorted(m.index for g in groups for m in g) == list(range(20)) and len(groups) == 6


@pytest.mark.parametrize("kind,wd", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.01), ("sgd", 0.01)])
def test_fused_optimizer_matches_torch(kind, wd):
    """Each row of the fused step equals torch.optim on that model alone, bit for bit on CPU."""
    cfg = Config()
    cfg.optim.optimizer, cfg.optim.weight_decay = kind, wd
    lrs = [0.1, 0.01, 0.003]
    models = [build_model(cfg.model, 10, 1, s) for s in range(3)]
    f = fuse(models, CPU)
    opt = FusedOptimizer(f, lrs, cfg)
    singles = [build_model(cfg.model, 10, 1, s) for s in range(3)]
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    torch_opts = [make(m.parameters(), lr=lr, weight_decay=wd) for m, lr in zip(singles, lrs)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [{n: torch.randn(p.shape, generator=gen) for n, p in m.named_parameters()} for m in singles]
        for m, o, g in zip(singles, torch_opts, grads):
            for n, p in m.named_parameters():
                p.grad = g[n].clone()
            o.step()
        # the same gradients, placed in the fused layout
        f.flat.grad = torch.zeros_like(f.flat)
        for name, b in f.blocks.items():
            view = f.view(name, f.flat.grad)
            for i in range(3):
                view[i].copy_(grads[i][name])
        opt.step()
    for i, m in enumerate(singles):
        for name, p in f.state_dict(i).items():
            torch.testing.assert_close(p, m.state_dict()[name], rtol=0, atol=0)


def test_fused_step_reads_nothing_back(monkeypatch):
    """The steady-state step (forward, backward, clipping, Adam) never asks for a value: on a
    GPU each such read (.item(), .tolist(), bool(), float()) would stall the host every step."""
    cfg = Config()
    X, y = synthetic_regression(seed=42)
    f = fuse([build_model(cfg.model, 10, 1, s) for s in range(3)], CPU)
    opt = FusedOptimizer(f, [0.01, 0.02, 0.03], cfg)

    def refuse(*_, **__):
        raise AssertionError("a value was read back inside the fused step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):
        train_step(f, X, y, "mse")
        clip_per_model(f, 1.0)
        opt.step(0.5)
        opt.zero_grad()
    monkeypatch.undo()
    assert torch.isfinite(f.flat).all()


def _alone(cfg: Config, member: Member, X, y, in_features: int, out_features: int):
    """The reference: the same model trained alone with gpupar.train on the same data."""
    # The fused sweep's per-model Adam follows torch's default (for-each) arithmetic, so the
    # reference uses it too: fused Adam rounds differently, and in batchnorm_net the Linear bias
    # before BatchNorm has a true gradient of 0, so Adam turns that rounding into full-size
    # steps that move the validation loss (eval mode, running statistics) by ~3%.
    c = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=member.lr, optimizer_impl="default"),
                            model=dataclasses.replace(cfg.model, hidden=member.hidden))
    model = build_model(c.model, in_features, out_features, member.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        result = gpupar.train(model, (X, y), config=c)
    return result


def _check_exact(cfg: Config, members, X, y, log=print, out_features=None):
    out_features = out_features or y.shape[1]
    train_set, val_set = as_samples((X, y), cfg)
    results, step_losses = train_chunk(members, cfg, train_set, val_set, X.shape[1], out_features, CPU, log)
    for j, m in enumerate(members):
        ref = _alone(cfg, m, X, y, X.shape[1], out_features)
        ref_losses = torch.tensor([r["loss"] for r in ref.history.records])
        torch.testing.assert_close(torch.tensor(results[j].losses).float(), ref_losses.float(), rtol=RTOL, atol=0)
        if val_set is not None:
            assert results[j].val_loss == pytest.approx(ref.history.records[-1]["val_loss"], rel=RTOL)
    return results, step_losses


def test_exact_simple_nn_each_model_as_if_alone():
    """64-model-style sweep in miniature: 4 seeds x 2 lrs, 100 full-batch epochs, per-epoch losses."""
    cfg = Config()
    cfg.train.progress, cfg.train.log_every, cfg.data.val_fraction = False, 1, 0.2
    X, y = synthetic_regression(seed=cfg.train.seed)
    members = grid([0, 1], [0.01, 0.1], [50])
    results, _ = _check_exact(cfg, members, X, y)
    assert results[0].losses[-1] < results[0].losses[0] / 10  # it did train


def test_exact_deep_mlp_minibatch_shuffle():
    """The hidden-to-hidden (batched) layers, mini-batches, shuffling and a cosine schedule."""
    cfg = Config()
    cfg.model.name, cfg.model.layers = "mlp", 3
    cfg.train.progress, cfg.train.log_every, cfg.train.epochs, cfg.train.batch_size = False, 1, 8, 100
    cfg.data.shuffle, cfg.optim.lr_schedule, cfg.optim.optimizer = True, "cosine", "adamw"
    X, y = synthetic_regression(seed=cfg.train.seed)
    _check_exact(cfg, grid([0, 1], [0.003, 0.03], [16]), X, y)


def test_exact_other_losses_and_chains():
    """The hand-written path beyond MSE into one output: l1 and cross-entropy (their gradient by
    autograd on the output), three classes (no outer-product shortcut), and Linears feeding
    Linears directly (the shortcut's scale reaching a hidden or the first layer without a ReLU)."""
    X, y = synthetic_regression(seed=42)
    cfg = Config()
    cfg.train.progress, cfg.train.log_every, cfg.train.epochs, cfg.data.val_fraction = False, 1, 15, 0.2
    cfg.train.loss = "l1"
    _check_exact(cfg, grid([0, 1], [0.01], [50]), X, y)
    for name in ("linear_linear", "relu_linear_linear"):
        cfg.model.name = f"test_sweep:{name}"
        assert fuse([globals()[name]()], CPU).kind == "linear"
        _check_exact(cfg, grid([0, 1], [0.01], [50]), X, y)
    cfg.model.name, cfg.train.loss, cfg.data.task = "simple-nn", "cross-entropy", "classification"
    classes = torch.bucketize(y[:, 0], y[:, 0].quantile(torch.tensor([1 / 3, 2 / 3])))  # [n] in 0..2
    _check_exact(cfg, grid([0, 1], [0.01], [50]), X, classes, out_features=3)


def linear_linear():
    return nn.Sequential(nn.Linear(10, 16), nn.Linear(16, 1))


def relu_linear_linear():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 1))


def test_exact_vmap_and_loop_fallback():
    """A user model goes through vmap; one with BatchNorm (in-place buffer updates) falls back and says so."""
    X, y = synthetic_regression(seed=42)
    cfg = Config()
    cfg.train.progress, cfg.train.log_every, cfg.train.epochs, cfg.data.val_fraction = False, 1, 20, 0.2
    cfg.model.name = "test_sweep:gelu_net"
    notes = []
    _check_exact(cfg, grid([0, 1], [0.01], [50]), X, y, log=notes.append)
    assert notes == []  # vmapped
    cfg.model.name = "test_sweep:batchnorm_net"
    _check_exact(cfg, grid([0, 1], [0.01], [50]), X, y, log=notes.append)
    assert len(notes) == 1 and "cannot be vmapped" in notes[0] and "buffers" in notes[0]


def gelu_net():
    return nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 1))


def batchnorm_net():
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def test_chunking_gives_the_same_models():
    cfg = Config()
    cfg.train.epochs, cfg.data.val_fraction = 10, 0.2
    members = grid(list(range(5)), [0.01], [32, 50])
    whole = run_sweep(cfg, members, Topology.single(CPU), log=lambda _: None)
    split = run_sweep(cfg, members, Topology.single(CPU), max_fused=2, log=lambda _: None)
    assert whole.chunks == 2 and split.chunks == 6
    a = {r.member.index: r.val_loss for r in whole.results}
    b = {r.member.index: r.val_loss for r in split.results}
    assert a.keys() == b.keys() == set(range(10))
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=RTOL)


def test_cli_sweep_table_outputs_and_export(gpupar, tmp_path):
    run_dir, export = tmp_path / "sweep", tmp_path / "exported" / "model.safetensors"
    code, out, err = gpupar("sweep", "--seeds", "0-7", "--lr", "0.01,0.1", "--epochs", "20",
                            "--run-dir", run_dir, "--export-best", export)
    assert code == 0, err
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\s+\d+\s+\d+\s+[\d.e-]+\s+\d+\s", line)]
    assert len(rows) == 16
    records = [json.loads(line) for line in (run_dir / "sweep.jsonl").read_text().splitlines()]
    assert len(records) == 16 and sorted(r["index"] for r in records) == list(range(16))
    vals = [r["val_loss"] for r in records]
    assert vals == sorted(vals)  # best first
    best = json.loads((run_dir / "best.json").read_text())
    assert best["index"] == records[0]["index"]
    # The export is a normal single model: rebuilt from the config.toml beside it, it has the
    # validation loss the sweep reported.
    saved = load_toml(export.parent / "config.toml")
    assert saved.optim.lr == best["lr"] and saved.train.seed == best["seed"]
    model = build_model(saved.model, 10, 1, 0)
    load_into(model, load_weights(export), "export")
    data_cfg = Config()
    data_cfg.data.val_fraction = 0.2
    X, y = synthetic_regression(seed=42)
    _, val_set = as_samples((X, y), data_cfg)
    xv, yv = val_set.take(slice(None))
    with torch.no_grad():
        assert nn.functional.mse_loss(model(xv), yv).item() == pytest.approx(best["val_loss"], rel=RTOL)
    # The directory is the sweep's now: a second sweep (or a train) there is refused, and the
    # sweep's files are byte-identical afterwards; --overwrite replaces it.
    before = (run_dir / "sweep.jsonl").read_bytes()
    for command in (("sweep", "--seeds", "0-1"), ("train",)):
        code, _, err = gpupar(*command, "--epochs", "2", "--run-dir", run_dir)
        assert code == 2 and f"--run-dir {run_dir} holds another run (" in err and "--overwrite" in err, err
    assert (run_dir / "sweep.jsonl").read_bytes() == before
    assert gpupar("sweep", "--seeds", "0-1", "--epochs", "2", "--run-dir", run_dir, "--overwrite")[0] == 0
    assert len((run_dir / "sweep.jsonl").read_text().splitlines()) == 2 and not list(run_dir.glob(".replaced-*"))


def test_cli_sweep_bad_input(gpupar):
    code, _, err = gpupar("sweep", "--seeds", "5-1")
    assert code == 2 and "--seeds '5-1'" in err
    code, _, err = gpupar("sweep", "--lr", "0.1,abc")
    assert code == 2 and "--lr '0.1,abc'" in err
    code, _, err = gpupar("sweep", "--max-fused", "0")
    assert code == 2 and "--max-fused" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = Config()
        cfg.train.epochs, cfg.data.val_fraction = 10, 0.2
        topo = Topology(device=CPU, rank=rank, world_size=world, dims=ParallelDims(dp_replicate=world))
        sweep = run_sweep(cfg, grid(list(range(5)), [0.01], [50]), topo, log=lambda _: None)
        queue.put((rank, [(r.member.index, r.val_loss) for r in sweep.results], sweep.best.state is not None))
    finally:
        dist.destroy_process_group()


def test_sharded_sweep_gathers_on_every_rank():
    """Two gloo ranks each train a slice; the gathered results equal the one-process sweep."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (rows, has_best)) for r, rows, has_best in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    cfg = Config()
    cfg.train.epochs, cfg.data.val_fraction = 10, 0.2
    alone = run_sweep(cfg, grid(list(range(5)), [0.01], [50]), Topology.single(CPU), log=lambda _: None)
    for rows, has_best in got.values():
        assert [i for i, _ in rows] == [r.member.index for r in alone.results]
        assert [v for _, v in rows] == pytest.approx([r.val_loss for r in alone.results], rel=RTOL)
        assert has_best


def test_unvmappable_model_falls_back_and_says_why():
    """A forward with data-dependent control flow fails under vmap: the loop takes over, exactly."""
    X, y = synthetic_regression(seed=42)
    cfg = Config()
    cfg.train.progress, cfg.train.log_every, cfg.train.epochs = False, 1, 5
    cfg.model.name = "test_sweep:branchy_net"
    notes = []
    _check_exact(cfg, grid([0, 1], [0.01], [50]), X, y, log=notes.append)
    assert len(notes) == 1 and "cannot be vmapped" in notes[0]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)

    def forward(self, x):
        out = self.fc(x)
        return out if out.sum() > -1e9 else -out  # .item()-style control flow: vmap refuses it


def branchy_net():
    return Branchy()
