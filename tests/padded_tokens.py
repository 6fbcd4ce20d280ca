"""A padded token batch of uneven lengths and a tiny token model: the loss-normalisation case.

Shared by tests/test_loss_norm.py (one process, grad-accum) and tests/mp_ranks.py (DDP).
"""

import torch
from torch import nn

from gpupar.models.gpt import TokenCrossEntropy


def padded_batch(rows: int = 8, seq: int = 6, vocab: int = 11):
    """Row r keeps its first min(1 + r, seq) targets and pads the rest with -100: at the defaults
    the halves of the batch hold 10 and 24 valid tokens, its quarters 3, 7, 11 and 12."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (rows, seq), generator=gen)
    y = torch.randint(0, vocab, (rows, seq), generator=gen)
    for r in range(rows):
        y[r, 1 + r:] = -100
    return x, y


def token_model(vocab: int = 11, width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(vocab, width), nn.Tanh(), nn.Linear(width, vocab))


def reference_grads(model: nn.Module, x, y) -> list[torch.Tensor]:
    """The single-device gradient of the mean over every valid token of the whole batch."""
    model.zero_grad()
    TokenCrossEntropy()(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def mean_of_means_grads(model: nn.Module, parts) -> list[torch.Tensor]:
    """What equal weights give: the mean of the parts' means (not the token mean)."""
    model.zero_grad()
    for x, y in parts:
        (TokenCrossEntropy()(model(x), y) / len(parts)).backward()
    return [p.grad.clone() for p in model.parameters()]
