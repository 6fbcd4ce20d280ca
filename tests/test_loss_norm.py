"""The loss over the global batch (issue 23): with padding, the gradient is that of the mean over
every valid token of the global batch, whatever the micro-batch split and the world size.
The DDP and pipeline cases run in tests/mp_ranks.py (test_model_parallel's one torchrun of 2
ranks: ddp_token_mean, and pp_token_mean through the schedule's own micro-batches)."""

import torch

from gpupar.models.gpt import TokenCrossEntropy
from gpupar.training.step import forward_backward

from padded_tokens import mean_of_means_grads, padded_batch, reference_grads, token_model


def test_grad_accum_weighs_micro_batches_by_their_valid_tokens():
    x, y = padded_batch()
    model = token_model()
    want = reference_grads(model, x, y)
    parts = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]  # 3, 7, 11 and 12 valid tokens
    # The test can tell: equal weights (a mean of means) are far from the token mean.
    naive = mean_of_means_grads(model, parts)
    assert max((a - b).abs().max() for a, b in zip(naive, want)) > 1e-2
    model.zero_grad()
    loss = forward_backward(model, parts, TokenCrossEntropy(), torch.autocast("cpu", enabled=False), None)
    # Float32 sums in another order: a few ulps of gradients of order 0.1.
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, TokenCrossEntropy()(model(x), y), rtol=1e-6, atol=0)


def test_a_micro_batch_of_padding_only_adds_nothing_instead_of_a_nan():
    """Rows 0 and 1 padded to the end: the first micro-batch holds no valid token. Its own mean
    is 0/0 = NaN (forward and backward), and a weight of 0 does not cancel a NaN; it must add
    nothing, so the gradient and loss are the token mean of the other micro-batches, finite."""
    x, y = padded_batch()
    y[:2] = -100
    model = token_model()
    want = reference_grads(model, x, y)
    assert torch.isnan(TokenCrossEntropy()(model(x[:2]), y[:2]))  # the trap the step must not fall in
    model.zero_grad()
    parts = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    loss = forward_backward(model, parts, TokenCrossEntropy(), torch.autocast("cpu", enabled=False), None)
    for p, w in zip(model.parameters(), want):  # the same float32 sums as above: a few ulps
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, TokenCrossEntropy()(model(x), y), rtol=1e-6, atol=0)
    assert torch.equal(y[:2], torch.full_like(y[:2], -100))  # the batch itself is left as it was
