"""A small decoder-only transformer (``--model gpt``) and a learnable synthetic token task.

The model is the GPT-2 shape (Radford et al., 2019): token + position embeddings, pre-norm
blocks of causal self-attention and a 4x MLP, a final norm and a vocabulary head. It is
written to be split and sharded without special cases:

- q, k, v and the output projection are separate ``nn.Linear`` layers, so tensor
  parallelism can shard q/k/v by columns (whole heads per rank) and the output by rows
  (Megatron-LM, Shoeybi et al., 2019). Attention reshapes with ``-1`` heads, so a rank
  holding ``heads / tp`` heads runs the same code.
- Blocks live in an ``nn.ModuleDict`` keyed "0".."L-1" and every top-level part may be
  ``None``: a pipeline stage is this same class with the parts it does not own removed,
  so parameter names stay those of the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpupar.config import ModelConfig
from gpupar.errors import UsageError
from gpupar.models.spec import ModelSpec


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.head_dim = hidden // heads
        self.q, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        # No key bias: q.b_k adds the same constant to every logit of a softmax row, so its
        # gradient is exactly 0 in theory and pure rounding noise in practice (which Adam
        # would amplify into full-size steps).
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H]
        B, T, _ = x.shape
        # [B, T, heads_here * head_dim] -> [B, heads_here, T, head_dim]; heads_here = heads / tp
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads_here, T, head_dim]
        return self.out(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, H]


class MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, 4H] -> [B, T, H]
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(hidden), Attention(hidden, heads)
        self.ln2, self.mlp = nn.LayerNorm(hidden), MLP(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 32):
        super().__init__()
        if hidden % heads:
            raise UsageError(f"--hidden {hidden} must be divisible by --heads {heads}")
        self.heads = heads
        self.tok_emb: nn.Module | None = nn.Embedding(vocab, hidden)
        self.pos_emb: nn.Module | None = nn.Embedding(seq_len, hidden)
        self.blocks = nn.ModuleDict({str(i): Block(hidden, heads) for i in range(layers)})
        self.norm: nn.Module | None = nn.LayerNorm(hidden)
        self.head: nn.Module | None = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:  # first stage: tokens [B, T] (int64) -> activations [B, T, H]
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.tok_emb(x) + self.pos_emb(positions)
        for block in self.blocks.values():
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.head is not None:  # last stage: [B, T, H] -> logits [B, T, vocab]
            x = self.head(x)
        return x

    def layer_units(self) -> list[list[str]]:
        """The model as a list of layers (module names), for pipeline and layer-split stages:
        the embeddings, each block, and the final norm with the head. The embeddings and the
        head are layers of their own (as torchtitan may place them), so a V-shaped schedule's
        2 x pp stages fit the default two blocks (embeddings | block | block | head), while the
        parameter balance still puts them beside a block wherever that is the better cut."""
        return [["tok_emb", "pos_emb"], *([f"blocks.{i}"] for i in self.blocks), ["norm", "head"]]


class TokenCrossEntropy(nn.Module):
    """Next-token cross-entropy: logits [B, T, V] against targets [B, T], mean over the tokens
    whose target is not ``ignore_index`` (padding). The step weighs micro-batches by their
    valid tokens (training/step.py ValidTokens)."""

    ignore_index = -100

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=self.ignore_index)


def synthetic_tokens(samples: int, seq_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences mod ``vocab``: token t = (start + stride * t) % vocab.

    Each sequence draws its own start and a stride from 1..7, so the next token is a
    deterministic function of the context that the model must infer (it needs two tokens
    to see the stride): attention has to look back, and the loss can fall towards 0.
    Returns inputs X [samples, seq_len] and next-token targets y [samples, seq_len], int64.
    """
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (samples, 1), generator=gen)
    stride = torch.randint(1, 8, (samples, 1), generator=gen)
    seq = (start + stride * torch.arange(seq_len + 1)) % vocab  # [samples, seq_len + 1]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def tp_plan(model: GPT, tp: int) -> dict:
    """Megatron-LM's plan per block: attention q/k/v colwise (whole heads per rank), its output
    rowwise; the MLP's up projection colwise and its down projection rowwise. Two all-reduces
    per block forward. Embeddings, norms and the vocabulary head stay whole (no sequence
    parallel). ``model`` may be a pipeline stage: it plans the blocks the stage holds."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if model.heads % tp:
        raise UsageError(f"--tp {tp} must divide --heads {model.heads}: each rank holds whole attention heads")
    plan: dict = {}
    for i in model.blocks:
        for name in ("attn.q", "attn.k", "attn.v", "mlp.up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.out", "mlp.down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    return plan


def gpt_spec(cfg: ModelConfig, hidden: int) -> ModelSpec:
    """The GPT's spec: next-token loss, the arithmetic-sequence task, seq_len tokens per sample,
    its TP plan and its pipeline layers (the input width of the data does not apply)."""
    return ModelSpec(
        "gpt", build=lambda n_in, n_out: GPT(cfg.vocab, hidden, cfg.layers, cfg.heads, cfg.seq_len),
        loss=TokenCrossEntropy,
        synthetic_data=lambda samples, seed: synthetic_tokens(samples, cfg.seq_len, cfg.vocab, seed),
        tokens_per_sample=cfg.seq_len, tp_plan=tp_plan, pipeline_units=GPT.layer_units)
