"""Rank-level checks of tensor and pipeline parallelism, run under torchrun with 2 ranks.

tests/test_model_parallel.py starts this once and reads "OK <name>" lines; each check
asserts on what the strategies actually did to the model (shard shapes, stage contents).
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.models.gpt import GPT, tp_plan
from gpupar.models import ModelSpec, mlp
from gpupar.parallel.pipeline import split_model
from gpupar.parallel.tensor import apply_tp, auto_plan
from gpupar.parallelize import full_state_dict, parallelize
from gpupar.topology import Topology
from pp_tied import pp_tied


def ok(name: str) -> None:
    if dist.get_rank() == 0:
        print(f"\nOK {name}", flush=True)  # a line of its own, even after a peer's partial line


def main() -> None:
    cfg = Config()
    cfg.parallel.tp = 2
    cfg.validate()
    topo = Topology.from_env(cfg)
    assert (topo.dp, topo.tp, topo.pp) == (1, 2, 1) and topo.mesh.mesh_dim_names == ("tp",)  # dims > 1 only
    assert topo.dp_rank == 0 and topo.tp_rank == topo.rank  # tp peers share one data shard
    ok("mesh")
    tensor_parallel_plans(topo, cfg)
    pipeline_split(topo, cfg)
    gloo_reduce_scatter(topo.mesh["tp"])
    ok("gloo-reduce-scatter")

    ddp_token_mean(topo.rank)
    ok("ddp-token-mean")
    pp_token_mean(topo.rank)
    ok("pp-token-mean")
    pp_token_mean(topo.rank, padding_only_first=True)
    ok("pp-token-mean-with-a-micro-batch-of-padding-only")
    losses_under_sharding(topo)
    pipeline_loss_scaler(topo.rank)
    ok("pipeline-loss-scaler")
    pp_batch_loss(topo.rank)
    ok("pp-loss-sees-the-batch")
    pp_tied(topo.rank)  # tests/pp_tied.py: a tie across stages trains as on one device
    ok("pp-tied")
    topo.close()


def tensor_parallel_plans(topo: Topology, cfg: Config) -> None:
    """The automatic, the GPT's and a user's plan shard what they should; a width or a head
    count that does not divide is one line."""
    # Automatic pairing on an mlp of 4 Linear layers: (0 colwise, 2 rowwise), (4 colwise, 6 rowwise).
    torch.manual_seed(0)
    model = mlp(10, 32, 4, 1)
    model = apply_tp(model, topo.mesh["tp"], auto_plan(model, torch.zeros(1, 10)))
    w0, w2, w6 = model[0].weight, model[2].weight, model[6].weight
    assert isinstance(w0, DTensor) and w0.placements == (Shard(0),) and w0.to_local().shape == (16, 10)
    assert w2.placements == (Shard(1),) and w2.to_local().shape == (32, 16)
    assert w6.placements == (Shard(1),) and w6.to_local().shape == (1, 16)
    ok("auto-pairing")

    # The GPT's per-block plan: q/k/v and mlp.up by columns, attn.out and mlp.down by rows.
    torch.manual_seed(0)
    gpt = GPT(vocab=16, hidden=32, layers=2, heads=4, seq_len=8)
    gpt = apply_tp(gpt, topo.mesh["tp"], tp_plan(gpt, 2))
    torch.manual_seed(0)
    reference = GPT(vocab=16, hidden=32, layers=2, heads=4, seq_len=8)
    block = gpt.blocks["1"]
    for layer in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
        assert layer.weight.placements == (Shard(0),)
    for layer in (block.attn.out, block.mlp.down):
        assert layer.weight.placements == (Shard(1),) and layer.bias.placements == (Replicate(),)
    assert not isinstance(gpt.head.weight, DTensor)  # the vocabulary head stays whole
    tokens = torch.randint(0, 16, (3, 8))
    torch.testing.assert_close(gpt(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    state = full_state_dict(gpt, topo)
    if topo.is_main:
        assert state.keys() == reference.state_dict().keys()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(state[name], value)
    ok("gpt-plan")

    # A user plan through the Python API: shard only the first layer's columns and the second's rows.
    torch.manual_seed(0)
    user = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    spec = ModelSpec("user", lambda n_in, n_out: user, tp_plan=lambda m, tp: {"0": ColwiseParallel(),
                                                                               "2": RowwiseParallel()})
    user = parallelize(user, topo, cfg, spec).model
    assert isinstance(user[0].weight, DTensor) and not isinstance(user[3].weight, DTensor)
    ok("user-plan")

    # Divisibility: 3 heads or a width of 33 cannot be split in 2.
    for bad, message in ((lambda: GPT(vocab=16, hidden=30, layers=1, heads=3, seq_len=8), "must divide --heads 3"),
                         (lambda: mlp(10, 33, 2, 1), "does not divide the 33 output features")):
        try:
            model = bad()
            apply_tp(model, topo.mesh["tp"], tp_plan(model, 2) if isinstance(model, GPT)
                     else auto_plan(model, torch.zeros(1, 10)))
        except UsageError as exc:
            assert message in str(exc), exc
        else:
            raise AssertionError(f"no error for {message}")
    ok("divisibility")


def pipeline_split(topo: Topology, cfg: Config) -> None:
    """Stages keep the whole model's names, round-robin over the ranks."""
    # Pipeline split keeps the whole model's names: rank 0 has the embeddings, rank 1 the head.
    cfg.parallel.schedule = "interleaved-1f1b"
    torch.manual_seed(0)
    gpt = GPT(vocab=16, hidden=32, layers=4, heads=4, seq_len=8)
    stages = split_model(gpt, GPT.layer_units(gpt), 2, topo.rank, cfg.parallel)
    assert [s for s, _ in stages] == [topo.rank, topo.rank + 2]  # round-robin: stage s on rank s % pp
    names = [set(module.state_dict()) for _, module in stages]
    if topo.rank == 0:
        assert "tok_emb.weight" in names[0] and any(n.startswith("blocks.2.") for n in names[1])
        assert not any(n.startswith(("blocks.1.", "head.")) for n in names[0] | names[1])
    else:
        assert "head.weight" in names[1] and any(n.startswith("blocks.1.") for n in names[0])
    ok("pipeline-split")


def losses_under_sharding(topo: Topology) -> None:
    """A user's loss under TP and FSDP: a penalty over DTensor parameters is one line, and the
    loss sees the whole output."""
    # A loss that reads the parameters (a weight penalty) meets TP's and FSDP's DTensor shards: one line.
    from torch.distributed.fsdp import fully_shard

    from gpupar.training.step import BatchLoss, forward_backward

    tp_model = apply_tp(mlp(10, 32, 2, 1), topo.mesh["tp"], auto_plan(mlp(10, 32, 2, 1), torch.zeros(1, 10)))
    fsdp_model = mlp(10, 32, 2, 1)
    for layer in fsdp_model:  # each layer its own unit, as gpupar's FSDP wraps blocks: resharded after forward
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=topo.mesh["tp"])
    for model in (tp_model, fully_shard(fsdp_model, mesh=topo.mesh["tp"])):
        penalty = BatchLoss(lambda out, batch, m=model: nn.functional.mse_loss(out, batch[1])
                            + sum((p ** 2).sum() for p in m.parameters()))
        try:
            forward_backward(model, [(torch.ones(4, 10), torch.ones(4, 1))], penalty,
                             torch.autocast("cpu", enabled=False), None)
        except UsageError as exc:
            assert "p.full_tensor()" in str(exc), exc
        else:
            raise AssertionError(f"a penalty over {type(model).__name__}'s DTensor parameters raised nothing")
    ok("loss-reads-parameters")
    # Under TP the user's loss sees what one device gives it: the whole output, a plain tensor
    # (a 3-layer MLP of width 16: the last layer, whose output leaves the model, stays whole).
    wide = mlp(10, 32, 3, 16)
    wide = apply_tp(wide, topo.mesh["tp"], auto_plan(wide, torch.zeros(1, 10)))
    seen = []
    look = BatchLoss(lambda out, batch: seen.append((type(out), tuple(out.shape))) or out.square().mean())
    forward_backward(wide, [(torch.ones(4, 10), torch.ones(4, 16))], look, torch.autocast("cpu", enabled=False), None)
    assert seen == [(torch.Tensor, (4, 16))], seen
    ok("tp-loss-sees-the-whole-output")


def pp_batch_loss(rank: int) -> None:
    """A user's loss(output, batch) under a 2-stage pipeline gets each micro-batch's (inputs,
    targets), as on one device: a loss weighted by an input column trains the one-device
    gradient and validates to the one-device loss. (It got the target alone, so ``x, y =
    batch`` split the target's rows: wrong, silently, wherever a micro-batch held 2 rows.)"""
    from gpupar.config import ParallelConfig
    from gpupar.parallel.pipeline import Pipeline, layer_units
    from gpupar.training.step import BatchLoss

    def weighted(out, batch):
        x, y = batch
        return (x[:, :1].abs() * (out - y) ** 2).mean()

    torch.manual_seed(0)
    whole, cpu = mlp(10, 16, 2, 1), torch.device("cpu")
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    reference_loss = weighted(whole(x), (x, y))
    reference_loss.backward()
    options = ParallelConfig(pp=2, schedule="1f1b")
    pipe = Pipeline(split_model(whole, layer_units(whole), 2, rank, options), 2, cpu, dist.group.WORLD, options,
                    cpu, microbatches=4)  # micro-batches of 2 rows: the shape the old bug passed silently
    loss = pipe.forward_backward([(x, y)], BatchLoss(weighted))
    torch.testing.assert_close(loss.float(), reference_loss.detach(), rtol=1e-6, atol=0)
    for name, p in pipe.named_parameters():  # float32 sums in another order: a few ulps
        torch.testing.assert_close(p.grad, whole.get_parameter(name.split(".", 2)[2]).grad, rtol=1e-5, atol=1e-7)

    class Rows:  # the samples interface evaluate_loss reads: take_to(rows, device) -> (x, y)
        def __len__(self):
            return len(x)

        def take_to(self, rows, device):
            return x[rows], y[rows]

    val = pipe.evaluate_loss(Rows(), BatchLoss(weighted), batch_size=4)
    want = float(reference_loss.detach())
    assert abs(val - want) < 1e-6, (val, want)


def pipeline_loss_scaler(rank: int) -> None:
    """fp16's loss scaler over a 2-stage pipeline (the world as the pp group): the backward runs
    from loss x S, the reported loss is the loss, and an Inf in stage 1's gradients alone skips
    the step on both stages and halves both scales (stage 0 never calls scale itself)."""
    from gpupar.config import ParallelConfig
    from gpupar.parallel.pipeline import Pipeline, layer_units
    from gpupar.parallel.pipeline_scaler import PipelineGradScaler

    torch.manual_seed(0)
    whole, cpu = mlp(10, 16, 2, 1), torch.device("cpu")
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    reference_loss = nn.functional.mse_loss(whole(x), y)
    reference_loss.backward()
    options = ParallelConfig(pp=2, schedule="1f1b")
    pipe = Pipeline(split_model(whole, layer_units(whole), 2, rank, options), 2, cpu, dist.group.WORLD, options,
                    cpu, microbatches=2)
    scaler = PipelineGradScaler(cpu, dist.group.WORLD, cpu, init_scale=2.0 ** 10)
    loss = pipe.forward_backward([(x, y)], nn.MSELoss(), None, scaler)
    torch.testing.assert_close(loss.float(), reference_loss.detach(), rtol=1e-6, atol=0)  # not x 1024
    for name, p in pipe.named_parameters():  # the stage's gradients are S x the whole batch's
        reference = whole.get_parameter(name.split(".", 2)[2]).grad
        torch.testing.assert_close(p.grad / 2.0 ** 10, reference, rtol=1e-5, atol=1e-7)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
    before = [p.detach().clone() for p in pipe.parameters()]
    if rank == 1:
        next(pipe.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, pipe.parameters())), f"rank {rank} stepped past an Inf"
    assert scaler.get_scale() == 2.0 ** 9, scaler.get_scale()
    optimizer.zero_grad()
    pipe.forward_backward([(x, y)], nn.MSELoss(), None, scaler)
    scaler.step(optimizer)
    scaler.update()
    assert not any(torch.equal(a, p) for a, p in zip(before, pipe.parameters())) and scaler.get_scale() == 2.0 ** 9


def ddp_token_mean(rank: int) -> None:
    """DDP with 2 micro-batches a rank over a padded batch (valid tokens 3, 7 | 11, 12): the
    gradient is the whole batch's token mean, not a mean of the ranks' or micro-batches' means."""
    from torch.nn.parallel import DistributedDataParallel

    from gpupar.models.gpt import TokenCrossEntropy
    from gpupar.training.step import forward_backward
    from padded_tokens import padded_batch, reference_grads, token_model

    x, y = padded_batch()
    want = reference_grads(token_model(), x, y)
    ddp = DistributedDataParallel(token_model())
    mine = [(x[i:i + 2], y[i:i + 2]) for i in range(4 * rank, 4 * rank + 4, 2)]
    forward_backward(ddp, mine, TokenCrossEntropy(), torch.autocast("cpu", enabled=False), None)
    for p, w in zip(ddp.module.parameters(), want):  # float32 sums in another order: a few ulps
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)


def pp_token_mean(rank: int, padding_only_first: bool = False) -> None:
    """A pipeline of 2 stages (the embedding | the head), 2 rounds (--grad-accum 2) of 2 micro-batches
    that the schedule cuts itself, over the padded batch (valid tokens 3, 7 | 11, 12): each stage's
    gradient is the whole batch's token mean, and so is the loss every rank returns.
    ``padding_only_first``: the first micro-batch holds no valid token (its own mean is 0/0): it
    must add nothing, not a NaN."""
    from torch.distributed.device_mesh import init_device_mesh

    from gpupar.config import ParallelConfig
    from gpupar.models.gpt import TokenCrossEntropy
    from gpupar.parallel.pipeline import Pipeline, layer_units
    from padded_tokens import padded_batch, reference_grads, token_model

    x, y = padded_batch()
    if padding_only_first:
        y[:2] = -100
    reference = token_model()
    want = dict(zip([n for n, _ in reference.named_parameters()], reference_grads(reference, x, y)))
    model, options = token_model(), ParallelConfig()
    stages = split_model(model, layer_units(model), 2, rank, options)
    group = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",)).get_group()
    pipe = Pipeline(stages, 2, torch.device("cpu"), group, options, torch.device("cpu"), microbatches=2)
    loss = pipe.forward_backward([(x[:4], y[:4]), (x[4:], y[4:])], TokenCrossEntropy())
    held = dict(stages[0][1].named_parameters())
    assert held and set(held) < set(want), held.keys()
    for name, p in held.items():  # float32 sums in another order: a few ulps
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.float(), TokenCrossEntropy()(reference(x), y).detach(), rtol=1e-6, atol=0)


def allocated(fn) -> int:
    """The allocations torch.profiler records on the calling thread while ``fn`` runs, summed
    over its events (an op's and its children's both count): 0 exactly when none was made."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events())


def gloo_reduce_scatter(mesh) -> None:
    """FSDP2 on gloo reduces in place: the same sums as gloo's reduce-scatter, and unlike it no
    copy of the input (which gloo frees on whichever thread drops its work last)."""
    from gpupar.parallel.fsdp import GlooReduceScatter, apply_fsdp, gloo_reduce_in_place

    group, rank = mesh.get_group(), dist.get_rank()
    for op, divide in ((dist.ReduceOp.SUM, 1), (dist.ReduceOp.AVG, 2)):
        inp = torch.arange(8.0) * (rank + 1)  # ranks 0 and 1: x and 2x; the sum is 3x
        out = torch.empty(4)
        GlooReduceScatter()(out, inp, group, op)
        assert torch.equal(out, torch.arange(8.0).view(2, 4)[rank] * 3 / divide), (op, out)
    big, out = torch.ones(1 << 16), torch.empty(1 << 15)
    assert allocated(lambda: dist.reduce_scatter_tensor(out, big, group=group)) >= big.nbytes  # gloo's copy
    assert allocated(lambda: GlooReduceScatter()(out, big, group, dist.ReduceOp.SUM)) == 0
    if gloo_reduce_in_place():
        model = apply_fsdp(mlp(10, 32, 3, 1), mesh, Config().parallel)
        units = [model, *(m for m in model.modules() if m is not model and hasattr(m, "set_custom_reduce_scatter"))]
        assert len(units) == 4  # the three Linear layers and the root
        for unit in units:
            assert all(isinstance(g._reduce_scatter_comm, GlooReduceScatter)
                       for g in unit._get_fsdp_state()._fsdp_param_groups)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
