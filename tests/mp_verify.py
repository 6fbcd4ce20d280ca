"""The verdict against injected bugs and chaotic-but-correct runs, at world 2 under torchrun.

tests/test_verify.py starts this once. It trains the single-device reference, the one-ulp
noise reference and every variant inside one process group (tiny models, STEPS full-batch
Adam steps), hands their trajectories to ``gpupar.parity.verdict.judge`` and prints "OK name" when
the verdict is what it must be: FAIL for every injected bug, PASS for every correct layout.
"""

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from gpupar.config import Config
from gpupar.data import shard_batch, synthetic_regression
from gpupar.training.loop import mean_over_ranks
from gpupar.models import ModelSpec
from gpupar.parity.noise import full_grads, nudge_weights
from gpupar.parallel.tensor import apply_tp
from gpupar.parallelize import full_state_dict, parallelize
from gpupar.training.step import forward_backward
from gpupar.topology import Topology
from gpupar.parity.verdict import Trajectory, judge, report

from user_models import residual_mlp, tied_blocks

STEPS, LR, FLOOR, BAND = 16, 0.05, 1e-5, 10.0
X, Y = synthetic_regression(128, 10, 0.1, 42)
LOSS = nn.MSELoss()


def softmax_mlp():
    """Linear, ReLU, square Linear, softmax over features, head: a feature-mixing op after layer 2."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Softmax(-1), nn.Linear(16, 1))


def ranks_config(strategy: str, **parallel) -> Config:
    cfg = Config()
    cfg.parallel.strategy = strategy
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg.validate()


def train(model, topo, shards, step=None, grad_accum=1) -> Trajectory | None:
    """STEPS Adam steps on the full batch; each rank's micro-batches come from ``shards(batch, rank)``."""
    step = step or (lambda mbs: forward_backward(model, mbs, LOSS, contextlib.nullcontext(), None))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, grads = [], None
    for i in range(STEPS):
        micro = [(X[idx], Y[idx]) for idx in (shards(m) for m in torch.arange(len(X)).chunk(grad_accum))]
        losses.append(step(micro))
        if i == 0:
            grads = full_grads(model, topo)
        opt.step()
        opt.zero_grad(set_to_none=True)
    losses = mean_over_ranks(losses, topo)
    final = full_state_dict(model, topo)
    return Trajectory(losses, final, grads) if topo.is_main else None


def single(factory, nudge=False, grad_accum=1) -> Trajectory:
    model = factory()
    if nudge:
        nudge_weights(model)
    return train(model, Topology.single(torch.device("cpu")), lambda m: m, grad_accum=grad_accum)


class Cases:
    """What every case needs: this rank's topology, its correct data slice, the references
    and ``check`` (judge a trajectory and print "OK name" when the verdict is as it must be)."""

    def __init__(self):
        self.ddp_cfg = ranks_config("ddp")
        self.topo = Topology.from_env(self.ddp_cfg)
        self.rank, self.world = self.topo.rank, self.topo.world_size
        self.spec = ModelSpec("user", lambda *_: None)
        self.ref, self.noise = single(residual_mlp), single(residual_mlp, nudge=True)

    def mine(self, m):
        return shard_batch(m, self.world, self.rank)  # this rank's correct slice

    def ddp_model(self):
        return parallelize(residual_mlp(), self.topo, self.ddp_cfg, self.spec)

    def check(self, name, got, must_pass, reference=None, noise_ref=None):
        dist.barrier()
        if self.rank != 0:
            return
        reference = self.ref if reference is None else reference
        verdict = judge(reference, self.noise if noise_ref is None else noise_ref, got, FLOOR, BAND)
        verdict.label = name
        text = report(verdict)
        assert verdict.passed == must_pass, text
        print(text.splitlines()[-1], flush=True)
        print(f"\nOK {name}", flush=True)  # a line of its own, even after a peer's partial line


def chaotic_but_correct(c: Cases) -> None:
    """DDP and FSDP through gpupar's own parallelize, on a model whose loss jumps 10x a step."""
    if c.rank == 0:
        assert max(max(a / b, b / a) for a, b in zip(c.ref.losses, c.ref.losses[1:])) >= 10, c.ref.losses
        assert max(b / a for a, b in zip(c.ref.losses, c.ref.losses[1:])) >= 3, c.ref.losses  # it goes up, too
    c.check("ddp-chaotic", train(c.ddp_model().model, c.topo, c.mine), True)
    fsdp_cfg = ranks_config("fsdp")
    p = parallelize(residual_mlp(), Topology.from_env(fsdp_cfg), fsdp_cfg, c.spec)
    c.check("fsdp-chaotic", train(p.model, c.topo, c.mine), True)


def sync_bugs(c: Cases) -> None:
    """Gradients summed, not averaged (scaled by W; Adam hides it after step 1); rank 1 keeping
    its own gradients; overlapping and shifted shards; one parameter left out of the sync."""
    rank, world = c.rank, c.world
    p = c.ddp_model()

    def sum_hook(state, bucket):
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    p.model.register_comm_hook(None, sum_hook)
    c.check("bug-grads-summed", train(p.model, c.topo, c.mine), False)
    p = c.ddp_model()

    def rank1_local(state, bucket):
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        local = bucket.buffer().clone()  # before the all-reduce writes into it
        return fut.then(lambda f: local * world if rank == 1 else f.value()[0])

    p.model.register_comm_hook(None, rank1_local)
    c.check("bug-rank1-not-averaged", train(p.model, c.topo, c.mine), False)
    c.check("bug-overlapping-shards", train(c.ddp_model().model, c.topo, lambda m: shard_batch(m, world, 0)), False)
    # Shifted: rank r's slice starts r samples late, so rank 1 repeats sample 0 and nobody sees sample 64.
    c.check("bug-shifted-shards", train(c.ddp_model().model, c.topo, lambda m: c.mine(m.roll(-rank))), False)
    model = residual_mlp()

    def skip_one(mbs):  # a hand-written all-reduce that skips one parameter
        loss = forward_backward(model, mbs, LOSS, contextlib.nullcontext(), None)
        for name, q in model.named_parameters():
            if name != "blocks.2.up.bias":
                dist.all_reduce(q.grad)
                q.grad /= world
        return loss

    c.check("bug-param-not-synced", train(model, c.topo, c.mine, step=skip_one), False)


def accumulation_and_forward_bugs(c: Cases) -> None:
    """--grad-accum 2 right, and with the loss not divided by the micro-batch count; rank 1's
    forward 1e-4 off (output x (1 + 1e-4))."""
    ref_acc, noise_acc = single(residual_mlp, grad_accum=2), single(residual_mlp, nudge=True, grad_accum=2)
    p = c.ddp_model()

    def undivided(mbs):
        total = 0.0
        for k, (x, y) in enumerate(mbs):
            with p.model.no_sync() if k < len(mbs) - 1 else contextlib.nullcontext():
                loss = LOSS(p.model(x), y)
                loss.backward()
            total += loss.item()
        return total / len(mbs)

    c.check("ddp-grad-accum", train(c.ddp_model().model, c.topo, c.mine, grad_accum=2), True, ref_acc, noise_acc)
    c.check("bug-grad-accum-undivided", train(p.model, c.topo, c.mine, step=undivided, grad_accum=2), False,
            ref_acc, noise_acc)
    p = c.ddp_model()
    if c.rank == 1:
        p.model.module.head.register_forward_hook(lambda mod, inp, out: out * (1 + 1e-4))
    c.check("bug-rank1-forward-1e-4", train(p.model, c.topo, c.mine), False)


def tensor_parallel_and_ties(c: Cases) -> None:
    """TP: layers 0/2 (ReLU between) shard correctly; sharding layer 2 by columns sends half the
    features through the softmax, which mixes features: wrong, silently. Tied weights and
    buffers (blocks 0 and 2 share one up-projection; a fixed and a counting buffer): DDP, FSDP
    (the two blocks shard as one unit) and TP (the plan's copies re-tied)."""
    tp_cfg = ranks_config("tp")
    tp_topo = Topology.from_env(tp_cfg)
    ref_tp, noise_tp = single(softmax_mlp), single(softmax_mlp, nudge=True)
    everything = lambda m: m  # noqa: E731  (tensor-parallel peers see the same data)
    right = apply_tp(softmax_mlp(), tp_topo.mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    c.check("tp-correct-plan", train(right, tp_topo, everything), True, ref_tp, noise_tp)
    wrong = apply_tp(softmax_mlp(), tp_topo.mesh["tp"], {"2": ColwiseParallel(), "4": RowwiseParallel()})
    c.check("bug-tp-wrong-plan", train(wrong, tp_topo, everything), False, ref_tp, noise_tp)
    ref_tied, noise_tied = single(tied_blocks), single(tied_blocks, nudge=True)
    for strategy in ("ddp", "fsdp", "tp"):
        cfg = ranks_config(strategy)
        t = Topology.from_env(cfg)
        p = parallelize(tied_blocks(), t, cfg, c.spec, X[:1])  # an automatic TP plan traces one row
        c.check(f"tied-{strategy}", train(p.model, t, everything if strategy == "tp" else c.mine), True,
                ref_tied, noise_tied)
        for name, buffer in p.model.named_buffers():  # every rank ends with the same buffers, not just rank 0
            everyone = [torch.empty_like(buffer) for _ in range(c.world)]
            dist.all_gather(everyone, buffer)
            assert all(torch.equal(b, buffer) for b in everyone), (strategy, name, everyone)


def main() -> None:
    torch.set_num_threads(1)
    cases = Cases()
    chaotic_but_correct(cases)
    sync_bugs(cases)
    accumulation_and_forward_bugs(cases)
    tensor_parallel_and_ties(cases)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
