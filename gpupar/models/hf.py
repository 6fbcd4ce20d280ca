"""Hugging Face transformers causal language models: ``--model hf:gpt2`` (or any model type
transformers knows) built from a config, ``--model hf:PATH`` from a local ``save_pretrained``
directory. Offline: nothing is fetched from the hub, ever.

The model is the library's own class, trained as it is: its output (a ``ModelOutput``) is
read by the step's loss rules (``training.step.loss_of``), its decoder layers are the
FSDP and activation-checkpointing units (``_no_split_modules``) and what pipeline stages cut
(``models/hf_pipeline.py``), and its parameter names
stay those ``from_pretrained`` expects, so ``gpupar export`` writes a directory that
transformers loads back.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from gpupar.config import ModelConfig
from gpupar.errors import UsageError, first_line
from gpupar.models.gpt import TokenCrossEntropy, synthetic_tokens
from gpupar.models.hf_pipeline import DecoderStage, pipeline_units
from gpupar.models.spec import ModelSpec

PREFIX = "hf:"


def is_hf(name: str) -> bool:
    return name.startswith(PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("--model hf:...: needs Hugging Face transformers (pip install 'gpupar[hf]')") from None
    transformers.logging.set_verbosity_error()  # config notes (token ids outside a tiny vocab) are not ours
    transformers.logging.disable_progress_bar()  # gpupar says what it wrote, in one line
    return transformers


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``n_layer=2,n_embd=64,tie_word_embeddings=false`` -> a dict of ints, floats, bools and strings."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--hf-config {item!r}: expected key=value pairs separated by commas")
        out[key.strip()] = _scalar(raw.strip())
    return out


def _scalar(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        if kind is float and not math.isfinite(value):
            raise UsageError(f"--hf-config value {raw!r} is not finite")
        return value
    return raw


def hf_config(cfg: ModelConfig):
    """The transformers config that ``cfg`` names: a model type with --hf-config overrides, or a
    local directory's config.json (overrides applied on top). Unknown keys are one line."""
    tf = _transformers()
    source, overrides = cfg.name[len(PREFIX):], parse_overrides(cfg.hf_config)
    if not source:
        raise UsageError("--model hf: needs a model type (hf:gpt2, hf:llama) or a local directory (hf:./my-model)")
    try:
        if Path(source).is_dir():
            config = tf.AutoConfig.from_pretrained(source, local_files_only=True)
        else:
            config = tf.AutoConfig.for_model(source)
    except (ValueError, OSError, KeyError) as exc:
        kinds = ", ".join(sorted(tf.CONFIG_MAPPING.keys())[:6])
        raise UsageError(f"--model {cfg.name!r}: neither a local save_pretrained directory nor a model type "
                         f"transformers knows (e.g. {kinds}, ...): {first_line(exc, '')}") from None
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"--hf-config {unknown[0]}: not a field of {type(config).__name__} "
                         f"(accepted: {', '.join(sorted(known - {'transformers_version', '_name_or_path'}))})")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.use_cache = False  # training: no key/value cache in the output
    return config


def hf_spec(cfg: ModelConfig) -> ModelSpec:
    """The spec of an ``hf:`` model: next-token cross-entropy on the logits (unless the batch
    carries ``labels``, when the model's own loss is used), the arithmetic-sequence task when no
    --data is given, and --seq-len tokens per sample."""
    config = hf_config(cfg)
    vocab = getattr(config, "vocab_size", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise UsageError(f"--model {cfg.name!r}: its config has no vocab_size; gpupar trains causal language models")
    if isinstance(positions, int) and cfg.seq_len > positions:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than the model's {positions} positions "
                         "(max_position_embeddings / n_positions)")
    source = cfg.name[len(PREFIX):]
    pretrained = Path(source).is_dir()

    def build(n_in: int, n_out: int) -> nn.Module:
        tf = _transformers()
        try:
            if pretrained:
                # weights as saved (safetensors); never remote code, never the hub
                return tf.AutoModelForCausalLM.from_pretrained(source, config=config, local_files_only=True,
                                                              trust_remote_code=False)
            return tf.AutoModelForCausalLM.from_config(config)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise UsageError(f"--model {cfg.name!r}: transformers cannot build it ({first_line(exc, '')})") from None

    return ModelSpec(
        cfg.name, build=build, loss=TokenCrossEntropy,
        synthetic_data=lambda samples, seed: synthetic_tokens(samples, cfg.seq_len, vocab, seed),
        tokens_per_sample=cfg.seq_len, tp_plan=hf_tp_plan,
        pipeline_units=pipeline_units, pipeline_stage=DecoderStage)  # stages run their own forward


def adopt(spec: ModelSpec, model: nn.Module) -> ModelSpec:
    """``spec`` for a model the user built and handed over (``gpupar.train(model)``,
    ``gpupar.setup``, ``--model module:factory``): a Hugging Face model gets what ``hf:`` gives
    it, its own tensor-parallel plan and its decoder layers as pipeline stages, so the same
    model trains the same way whichever way it came in. Any other model keeps ``spec``.
    A model of transformers' classes means transformers is imported already: nothing is
    imported here for the others."""
    tf = sys.modules.get("transformers")
    if spec.pipeline_stage is not None or tf is None or not isinstance(model, tf.PreTrainedModel):
        return spec
    return dataclasses.replace(spec, tp_plan=spec.tp_plan or hf_tp_plan, pipeline_units=pipeline_units,
                               pipeline_stage=DecoderStage)


# transformers' plan styles: the pairs gpupar shards, and those whose layer may stay whole
# (its output is gathered or all-reduced back to the whole tensor: the same values either way).
_SHARDED = ("colwise", "rowwise")
_WHOLE = ("colwise_gather_output", "embedding_rowwise", "replicated_with_grad_allreduce", "gather")


def hf_tp_plan(model: nn.Module, tp: int) -> dict | None:
    """The model's own tensor-parallel plan (``base_model_tp_plan``, which transformers writes
    per architecture and prefixes for the LM head model), for the attention and MLP pairs.

    The attention reshapes by head, so each rank must hold whole query and key/value heads.
    Styles that gather back to the whole tensor leave their layer whole; any other style
    (packed, local, sequence-parallel, expert) is refused rather than guessed."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    own = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    if not own:  # no plan of its own (GPT-2): the automatic plan, proven by a trace; its fused
        return None  # qkv is split by a view, so only the MLP pairs (c_fc, c_proj) are sharded
    config = model.config
    for attr in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, attr, None)
        if isinstance(heads, int) and heads % tp:
            raise UsageError(f"--tp {tp} must divide the model's {attr} ({heads}): each rank holds whole heads")
    unknown = sorted({style for style in own.values() if style not in _SHARDED + _WHOLE})
    if unknown:
        raise UsageError(f"--tp: {type(model).__name__}'s plan uses {', '.join(unknown)}, which gpupar does not "
                         f"apply; it applies {', '.join(_SHARDED)} and leaves {', '.join(_WHOLE)} layers whole")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {}
    for name, _ in model.named_modules():
        style = own.get(re.sub(r"\.\d+(?=\.|$)", ".*", name))
        if style in styles:
            plan[name] = styles[style]()
    return plan
