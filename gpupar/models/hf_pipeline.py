"""Pipeline stages of Hugging Face causal language models (``--pp`` on ``hf:`` models).

A decoder's layers sit one level down (``transformer.h`` in GPT-2, ``model.layers`` in Llama),
and each layer needs what the model's own forward makes before the first one: the positions,
the causal mask (``create_causal_mask``) and, in Llama, the rotary embedding. A stage cut
between layers cannot run the model's forward, so each stage runs its own: the first embeds
the tokens, every stage remakes the positions, the mask and the rotary embedding from the
hidden states it receives (they depend on their shape only, and the parameter-free modules
that make them stay on every stage), and the last applies the final norm and the output head.
The computation is the model's forward, step for step; verify proves it against one device.

The stage keeps the whole model's parameter names (``transformer.h.1.attn.c_attn.weight``),
so checkpoints, export and verify see the model they know. Two model types are known, by
their ``config.model_type``: ``gpt2`` (``wte``, ``wpe``, ``drop``, ``h``, ``ln_f``) and
``llama`` (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``). Others that keep the same
parts may scale the embeddings (Gemma) or mask by a sliding window (Mistral), which a stage
would silently skip, so any other type is one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpupar.errors import UsageError


@dataclass(frozen=True)
class DecoderParts:
    """Where a decoder family keeps its parts: module names in the LM head model."""

    family: str
    """"gpt2" or "llama": which layer call and which embeddings the stage's forward makes."""
    embed: str
    """The token embedding (first stage)."""
    layers: str
    """The list of decoder layers that the stages cut."""
    norm: str
    """The final norm (last stage)."""
    positions: str | None = None
    """GPT-2's learned position embedding (first stage), added to the token embedding."""
    dropout: str | None = None
    """GPT-2's embedding dropout (first stage; parameter-free)."""
    rotary: str | None = None
    """Llama's rotary embedding (parameter-free: every stage keeps it and remakes its cos/sin)."""
    head: str = "lm_head"
    """The output head (last stage)."""


FAMILIES = ("gpt2", "llama")
"""The model types whose forward a stage repeats (verify proves both under --pp 2)."""


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The parts of ``model``'s decoder, found from its own decoder layer class
    (``_no_split_modules``) and the names its family gives the modules around the list."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in FAMILIES:
        raise UsageError(f"--pp on {type(model).__name__} (model type {kind!r}): gpupar cuts the decoders of "
                         f"{' and '.join(FAMILIES)} models into pipeline stages; use --strategy fsdp or --tp")
    layers = _decoder_list(model)
    base, _, _ = layers.rpartition(".")
    inner = model.get_submodule(base) if base else model
    prefix = base + "." if base else ""
    # A stage's copy keeps the names of the modules it lost (as None); the head sits at the top.
    has = set(inner._modules) if "lm_head" in model._modules else set()
    if kind == "gpt2" and {"wte", "wpe", "h", "ln_f"} <= has:
        return DecoderParts("gpt2", prefix + "wte", layers, prefix + "ln_f", positions=prefix + "wpe",
                            dropout=prefix + "drop" if "drop" in has else None)
    if kind == "llama" and {"embed_tokens", "layers", "norm", "rotary_emb"} <= has:
        return DecoderParts("llama", prefix + "embed_tokens", layers, prefix + "norm", rotary=prefix + "rotary_emb")
    raise UsageError(f"--pp on {type(model).__name__}: a {kind} decoder keeps "
                     f"{'wte, wpe, h, ln_f' if kind == 'gpt2' else 'embed_tokens, layers, norm, rotary_emb'} beside "
                     f"lm_head, this one {', '.join(sorted(inner._modules))}; use --strategy fsdp or --tp")


def _decoder_list(model: nn.Module) -> str:
    """The name of the ModuleList that holds the model's decoder layers (its ``_no_split_modules``)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                all(type(child).__name__ in classes for child in module):
            return name
    raise UsageError(f"--pp on {type(model).__name__}: no list of its decoder layers "
                     f"({', '.join(sorted(classes)) or 'no _no_split_modules'}) to cut into stages; "
                     "use --strategy fsdp or --tp")


def pipeline_units(model: nn.Module) -> list[list[str]]:
    """The decoder layers as pipeline layers: the embeddings join the first, the final norm and
    the head the last. Parameter-free parts (dropout, rotary embedding) are in no layer, so
    every stage keeps them."""
    parts = decoder_parts(model)
    units = [[f"{parts.layers}.{name}"] for name, _ in model.get_submodule(parts.layers).named_children()]
    units[0][:0] = [parts.embed] + ([parts.positions] if parts.positions else [])
    units[-1] += [parts.norm, parts.head]
    return units


class DecoderStage(nn.Module):
    """One pipeline stage of a Hugging Face decoder: the model's children (with the other
    stages' modules removed), so parameter names stay the whole model's, and a forward that
    runs the layers this stage holds (see the module docstring).

    Input: token ids [B, T] on the first stage, hidden states [B, T, H] on the others.
    Output: logits [B, T, V] on the last stage, hidden states [B, T, H] on the others."""

    def __init__(self, pruned: nn.Module):
        super().__init__()
        self.parts = decoder_parts(pruned)
        for name, child in pruned.named_children():
            self.add_module(name, child)
        self.config = pruned.config
        self._no_split_modules = getattr(pruned, "_no_split_modules", None)  # FSDP and checkpointing units

    def _part(self, name: str | None) -> nn.Module | None:
        """The module at ``name``, or None where this stage does not hold it."""
        module: nn.Module | None = self if name else None
        for attr in (name or "").split("."):
            module = module._modules.get(attr) if module is not None else None
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        parts = self.parts
        embed = self._part(parts.embed)
        hidden = embed(x) if embed is not None else x  # [B, T] ids -> [B, T, H], or received [B, T, H]
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
        # The mask depends on the hidden states' shape, dtype and device only (no padding mask).
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
        if parts.family == "gpt2":
            if embed is not None:
                hidden = hidden + self._part(parts.positions)(positions)
                dropout = self._part(parts.dropout)
                hidden = dropout(hidden) if dropout is not None else hidden
            for block in self._part(parts.layers).children():
                hidden = block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                               position_ids=positions)
        else:
            rotary = self._part(parts.rotary)(hidden, position_ids=positions)  # (cos, sin)
            for layer in self._part(parts.layers).children():
                hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
                               cache=None, use_cache=False)
        norm, head = self._part(parts.norm), self._part(parts.head)
        if norm is not None:  # last stage: the final norm, then the vocabulary head
            hidden = norm(hidden)
        return head(hidden) if head is not None else hidden

    @staticmethod
    def as_output(logits: torch.Tensor):
        """The last stage's logits as the model's own forward returns them (a ``ModelOutput``),
        for a user's ``loss(output, batch)`` that reads ``output.logits`` as on one device."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=logits)
