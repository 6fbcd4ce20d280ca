"""A tie across pipeline stages (gpupar/parallel/tied.py: StageTies), checked on 2 real ranks.

A tiny GPT whose output head is its token embedding (the tie of GPT-2's wte and lm_head):
under 1f1b the embedding is on rank 0 and the head on rank 1; under zbv both on rank 0, in two
stage modules. tests/mp_ranks.py runs ``pp_tied`` once, inside its one torchrun of 2 ranks.
"""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gpupar.config import ParallelConfig
from gpupar.models.gpt import GPT, TokenCrossEntropy
from gpupar.parallel.pipeline import Pipeline, split_model
from gpupar.parallel.pipeline_scaler import PipelineGradScaler
from gpupar.parallel.pipeline_state import load_state_dicts, state_dicts, whole_name
from gpupar.parallel.tied import tied_parameters

CPU = torch.device("cpu")
STEPS, LR, CLIP = 3, 0.5, 0.05  # a clip below every step's norm: each step is clipped


def tied_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab=16, hidden=16, layers=2, heads=2, seq_len=8)
    model.head.weight = model.tok_emb.weight  # [16, 16]: the head projects onto the embedding
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 16, (4, 8), generator=gen), torch.randint(0, 16, (4, 8), generator=gen))
            for _ in range(STEPS)]


def reference():
    """One device: per step (loss, {name: grad}, clip norm), and the final model and optimizer."""
    model = tied_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    steps = []
    for x, y in batches():
        loss = TokenCrossEntropy()(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        steps.append((loss.detach(), grads, torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad()
    return steps, model, optimizer


def pp_tied(rank: int) -> None:
    steps, ref_model, _ = reference()
    copies_laid_out_differently_is_one_line(rank)
    for schedule in ("1f1b", "zbv"):
        options = ParallelConfig(pp=2, schedule=schedule)
        model = tied_gpt()
        stages = split_model(model, GPT.layer_units(model), 2, rank, options)
        pipe = Pipeline(stages, 4 if schedule == "zbv" else 2, CPU, dist.group.WORLD, options, CPU,
                        microbatches=2, ties=tied_parameters(model))
        optimizer = torch.optim.SGD(pipe.parameters(), lr=LR, momentum=0.9)
        copies = pipe.ties.copies[0]  # this rank's copies of the tie: 1f1b one a rank, zbv two on rank 0
        assert len(copies) == ({"1f1b": 1, "zbv": 2 if rank == 0 else 0}[schedule]), (schedule, rank, len(copies))
        for (ref_loss, ref_grads, ref_norm), (x, y) in zip(steps, batches()):
            loss = pipe.forward_backward([(x, y)], TokenCrossEntropy())
            # float32 sums in another order (two micro-batches, and the tie's two uses added by
            # StageTies rather than by autograd): a few ulps, so 1e-5 relative.
            torch.testing.assert_close(loss.float(), ref_loss, rtol=1e-5, atol=0)
            for name, p in pipe.named_parameters(remove_duplicate=False):
                torch.testing.assert_close(p.grad, ref_grads[whole_name(name)], rtol=1e-5, atol=1e-7, msg=name)
            # The clip norm counts the tie once: the one-device norm, not one with the tie twice.
            torch.testing.assert_close(pipe.clip_grad_norm_(CLIP), ref_norm, rtol=1e-5, atol=0)
            optimizer.step()
            optimizer.zero_grad()
        check_copies_equal(pipe, rank, schedule)
        for name, p in pipe.named_parameters():  # 3 clipped SGD steps: the same few ulps, not grown
            torch.testing.assert_close(p, ref_model.get_parameter(whole_name(name)), rtol=1e-5, atol=1e-6)
        if schedule == "1f1b":
            scaled_grads_are_summed(pipe)
            checkpoint_resumes_on_one_device(pipe, optimizer, rank)


def check_copies_equal(pipe: Pipeline, rank: int, schedule: str) -> None:
    """The copies stayed bit-equal: the same summed gradient, the same optimizer step."""
    copies = pipe.ties.copies[0]
    if schedule == "zbv":
        assert rank == 1 or torch.equal(copies[0], copies[1])
        return
    both = [torch.empty_like(copies[0]) for _ in range(2)]
    dist.all_gather(both, copies[0].detach())
    assert torch.equal(both[0], both[1]), (both[0] - both[1]).abs().max()


def scaled_grads_are_summed(pipe: Pipeline) -> None:
    """fp16's loss scaler: the copies hold S x the summed gradient when the scaler unscales and
    checks them (against the same batch's unscaled summed gradient; S a power of 2). And
    accumulation over calls sums each call once."""
    x, y = batches()[0]
    pipe.forward_backward([(x, y)], TokenCrossEntropy())
    plain = pipe.ties.copies[0][0].grad.clone()
    pipe.zero_grad()
    scaler = PipelineGradScaler(CPU, dist.group.WORLD, CPU, init_scale=2.0 ** 8)
    pipe.forward_backward([(x, y)], TokenCrossEntropy(), None, scaler)
    torch.testing.assert_close(pipe.ties.copies[0][0].grad / 2.0 ** 8, plain, rtol=1e-6, atol=1e-9)
    pipe.zero_grad()
    # A loop that accumulates over two calls (gp.forward_backward twice before the step): each
    # call's uses are summed once, so the same batch twice is exactly twice the gradient.
    for _ in range(2):
        pipe.forward_backward([(x, y)], TokenCrossEntropy())
    assert torch.equal(pipe.ties.copies[0][0].grad, 2 * plain)
    pipe.zero_grad()


def checkpoint_resumes_on_one_device(pipe: Pipeline, optimizer, rank: int) -> None:
    """A pp 2 checkpoint (each rank writes its stage's part through DCP) loads on one device into
    the tied model, the tie intact, the weights the pipeline's and the momentum the tie's one."""
    mine = {whole_name(n): p.detach().clone() for n, p in pipe.named_parameters()}
    momentum = {whole_name(n): optimizer.state[p]["momentum_buffer"].clone() for n, p in pipe.named_parameters()}
    everyone: list = [None, None]
    dist.all_gather_object(everyone, (mine, momentum))
    model_sd, optim_sd = state_dicts(pipe, optimizer)
    assert list(optim_sd["param_groups"][0]["params"]).count("tok_emb.weight") == 1
    assert "head.weight" not in optim_sd["param_groups"][0]["params"]  # the tie under its first name only
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id="pp_tied_ckpt")
    dist.barrier()
    if rank == 0:
        one = tied_gpt()
        one_optim = torch.optim.SGD(one.parameters(), lr=LR, momentum=0.9)
        one_sd, one_optim_sd = state_dicts(one, one_optim)
        state = {"model": one_sd, "optim": one_optim_sd}
        dcp.load(state, checkpoint_id="pp_tied_ckpt", no_dist=True)
        load_state_dicts(one, one_optim, state["model"], state["optim"])
        assert one.head.weight is one.tok_emb.weight  # the tie holds: one Parameter
        weights = {**everyone[0][0], **everyone[1][0]}
        for name, p in one.named_parameters(remove_duplicate=False):
            assert torch.equal(p, weights[name]), name
        moments = {**everyone[0][1], **everyone[1][1]}
        for name, p in one.named_parameters():
            assert torch.equal(one_optim.state[p]["momentum_buffer"], moments[name]), name
        assert torch.equal(moments["head.weight"], moments["tok_emb.weight"])  # the copies' moments agree
    dist.barrier()


def copies_laid_out_differently_is_one_line(rank: int) -> None:
    """Copies whose local shards differ (a tie sharded unlike across stages) could not be added
    up: every rank raises the same line at setup, none waits in a collective."""
    from gpupar.errors import UsageError

    options = ParallelConfig(pp=2, schedule="1f1b")
    model = tied_gpt()
    stages = split_model(model, GPT.layer_units(model), 2, rank, options)
    try:  # a "tie" of the [16, 16] token embedding (rank 0) and the [16] final norm's weight (rank 1)
        Pipeline(stages, 2, CPU, dist.group.WORLD, options, CPU, microbatches=2,
                 ties=[["tok_emb.weight", "norm.weight"]])
    except UsageError as exc:
        assert "copies of the tied 'tok_emb.weight' are laid out differently ([16, 16] whole; [16] whole)" in str(exc), exc
    else:
        raise AssertionError("copies of different shapes were summed")
