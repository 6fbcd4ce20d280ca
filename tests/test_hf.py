"""Models as they are: Hugging Face GPT-2 and Llama from tiny configs (transformers' own classes,
random weights, offline), outputs that are not tensors, the user's own loss, export to a
from_pretrained directory, and verify on real models (the false FAILs of issue 23)."""

import re

import pytest
import torch
from torch import nn

from gpupar.config import Config, ModelConfig
from gpupar.errors import UsageError
from gpupar.models import check_shapes, model_spec
from gpupar.training.step import BatchLoss, loss_of

from harness import gpupar

transformers = pytest.importorskip("transformers")

GPT2 = ("--model", "hf:gpt2", "--hf-config", "n_layer=2,n_embd=64,n_head=4,vocab_size=256,n_positions=64",
        "--seq-len", "32")
LLAMA = ("--model", "hf:llama", "--hf-config", "hidden_size=64,intermediate_size=128,num_hidden_layers=2,"
         "num_attention_heads=4,num_key_value_heads=2,vocab_size=256,max_position_embeddings=64", "--seq-len", "32")
PASS = re.compile(r"^PASS: ", re.M)


class _Out(dict):
    """A dict with attribute access, as a ModelOutput is."""
    __getattr__ = dict.get


def test_the_loss_comes_from_the_user_then_the_model_then_the_criterion():
    logits, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    mse = nn.MSELoss()
    # the criterion on the predictions inside a tuple, a dict and a ModelOutput-like output
    for output in (logits, (logits, "cache"), {"logits": logits}, _Out(logits=logits, loss=None)):
        assert loss_of(mse, output, (None, target), target) == mse(logits, target)
    # the model's own loss wins over the criterion; the user's function wins over both
    own = _Out(logits=logits, loss=torch.tensor(7.0))
    assert loss_of(mse, own, (None, target), target) == 7.0
    seen = []
    user = BatchLoss(lambda out, batch: seen.append((out, batch)) or torch.tensor(3.0))
    assert loss_of(user, own, {"input_ids": 1}, None) == 3.0 and seen == [(own, {"input_ids": 1})]


def test_a_dict_batch_feeds_the_forward_by_its_signature():
    """Entries the forward does not take (labels, an index) stay in the batch: the target and the
    loss read them. A user's token model with a padding mask trains through gpupar.train."""
    import gpupar
    from gpupar.models.gpt import TokenCrossEntropy
    from gpupar.training.step import call_model

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            return self.head(h * attention_mask[..., None] if attention_mask is not None else h)

    ids = torch.randint(0, 11, (16, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(16, 6)
    labels = ids.roll(-1, 1)
    assert call_model(Masked(), (), {"input_ids": ids, "attention_mask": mask, "labels": labels, "idx": 0}).shape == (16, 6, 11)
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}

    data = Rows()
    cfg = gpupar.Config()
    cfg.train.epochs, cfg.train.batch_size = 30, 8
    result = gpupar.train(Masked(), data, loss=TokenCrossEntropy(), config=cfg)
    losses = result.history.step_losses
    assert losses[-1] < losses[0] * 0.9, losses


def test_hf_models_build_from_a_config_and_bad_configs_are_one_line():
    cfg = ModelConfig(name="hf:gpt2", hf_config="n_layer=1,n_embd=32,n_head=2,vocab_size=64,n_positions=16",
                      seq_len=16)
    model = model_spec(cfg).build(0, 0)
    assert type(model).__name__ == "GPT2LMHeadModel" and len(model.transformer.h) == 1
    class TupleOut(nn.Linear):  # predictions first, something else after: the predictions are checked
        def forward(self, x):
            return super().forward(x), "extra"
    check_shapes(TupleOut(3, 1), torch.ones(4, 3), torch.ones(4, 1), "regression")
    with pytest.raises(UsageError, match=r"model output shape \[2\] does not match target shape \[1\]"):
        check_shapes(TupleOut(3, 2), torch.ones(4, 3), torch.ones(4, 1), "regression")
    for name, hf_config, message in [
            ("hf:gpt2", "n_layerz=2", "--hf-config n_layerz: not a field of GPT2Config"),
            ("hf:gpt2", "n_layer", "--hf-config 'n_layer': expected key=value"),
            ("hf:no-such-type", None, "neither a local save_pretrained directory nor a model type"),
            ("hf:gpt2", "n_positions=8", "--seq-len 16 is longer than the model's 8 positions")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            model_spec(ModelConfig(name=name, hf_config=hf_config, seq_len=16))
    with pytest.raises(UsageError, match="--loss 'nope'"):
        c = Config()
        c.train.loss = "nope"
        c.validate()


def test_gpt2_trains_from_the_cli_and_exports_a_from_pretrained_directory(tmp_path, gpupar_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI's main runs in this process; its paths are relative
    code, out, err = gpupar_cli("train", *GPT2, "--samples", 64, "--batch-size", 16, "--epochs", 4, "--log-every", 1,
                                "--checkpoint-every", 8, "--run-dir", "r")
    assert code == 0, err
    losses = [float(v) for v in re.findall(r"Loss: ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, out  # it learns the token task
    for source, out in ((("--run", "r"), "hf"), (("--checkpoint", "r/checkpoints/step-16"), "hf-ckpt")):
        code, _, err = gpupar_cli("export", *source, "--out", out)
        assert code == 0, err
    # The exported directory loads with from_pretrained and computes the trained model's logits.
    from safetensors.torch import load_file
    trained = model_spec(ModelConfig(name=GPT2[1], hf_config=GPT2[3], seq_len=32)).build(0, 0)
    trained.load_state_dict(load_file(tmp_path / "r" / "model.safetensors"), strict=False)
    x = torch.randint(0, 256, (2, 32))
    trained.eval()
    for out in ("hf", "hf-ckpt"):  # the run's last step is the step-16 checkpoint: the same weights
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, local_files_only=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, trained(x).logits, rtol=0, atol=1e-6)
    code, _, err = gpupar_cli("export", "--run", "r", "--out", "hf")  # never over a model directory
    assert code == 2 and "must be a new or empty directory" in err


@pytest.mark.parametrize("model,layout,seed", [(GPT2, ("--strategy", "ddp"), 42), (LLAMA, ("--strategy", "fsdp", "--activation-checkpointing", "full"), 1),
                                               (LLAMA, ("--tp", 2), 2), (GPT2, ("--tp", 2), 1),
                                               (GPT2, ("--pp", 2), 42)])
def test_verify_passes_on_hugging_face_models(tmp_path, model, layout, seed):
    """GPT-2 under DDP at seed 42 was a false FAIL with the nudge alone (NOTES.md: 9.5e-5 gap,
    9.1e-6 noise); the summation-order reference measures the noise the all-reduce adds.
    Llama under --tp 2 shards by its own plan (whole heads, two key/value heads split in two);
    GPT-2 by the traced plan of its Conv1D MLP pairs (the pre-launch trace runs under a fake mode).
    Under --pp 2 each stage runs its own decoder forward (models/hf_pipeline.py); GPT-2 tied, as
    it comes: wte on the first stage and lm_head on the last, each a copy whose gradients are
    summed after every backward (parallel/tied.py: StageTies)."""
    proc, _ = gpupar("verify", *model, "--samples", 64, "--epochs", 12, *layout,
                     "--nproc-per-node", 2, "--no-dropout", "--seed", seed, cwd=tmp_path, timeout=400)
    assert proc.returncode == 0 and PASS.search(proc.stdout), proc.stdout + proc.stderr
    assert "summation-order reference" in proc.stdout


def test_a_hugging_face_model_handed_to_gpupar_train_gets_its_own_stages_and_plan(tmp_path):
    """tests/api_hf.py under torchrun: a LlamaForCausalLM object (not ``hf:``) with the user's
    ``loss(output, batch)`` trains under --pp 2 and --tp 2 to the one-device losses (rtol 1e-5,
    stated there). Under --pp it was refused ("cannot trace ... wrap its layers in an
    nn.Sequential"): gpupar knew its decoder stages only by the ``hf:`` name."""
    from harness import TESTS

    proc, _ = gpupar("--nproc-per-node", 2, str(TESTS / "api_hf.py"), cwd=tmp_path,
                     prefix=("-m", "torch.distributed.run"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^OK (\S+)", proc.stdout, re.M) == ["pp", "tp"]


def test_layouts_of_hugging_face_models_use_their_own_layers_and_plans(gpupar_cli):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from gpupar.models.hf import hf_tp_plan
    from gpupar.parallel.tensor import auto_plan

    from gpupar.parallel.activation_checkpoint import checkpoint_blocks
    from gpupar.parallel.fsdp import pick_blocks

    llama = _build(LLAMA)
    # FSDP units and checkpointed blocks: each decoder layer (the model's _no_split_modules).
    assert [type(b).__name__ for b in pick_blocks(llama)] == ["LlamaDecoderLayer"] * 2
    assert [type(b).__name__ for b in checkpoint_blocks(llama)] == ["LlamaDecoderLayer"] * 2
    own = {name: type(style) for name, style in hf_tp_plan(llama, 2).items()}
    assert own == {f"model.layers.{i}.{n}": (RowwiseParallel if n.endswith(("o_proj", "down_proj")) else ColwiseParallel)
                   for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    with pytest.raises(UsageError, match=r"--tp 4 must divide the model's num_key_value_heads \(2\)"):
        hf_tp_plan(llama, 4)
    # Without its own plan, the trace proves the MLP group (silu(gate) * up -> down) and leaves
    # q_proj and k_proj whole: paired as siblings they had crashed every rank (issue 23).
    traced = auto_plan(llama, torch.zeros(1, 8, dtype=torch.long))
    assert set(traced) == {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}
    # GPT-2 has no plan of its own and keeps q, k and v fused in one Conv1D that a view splits:
    # the trace proves its MLP pairs only, sharded as Conv1D's (in, out) weights are stored.
    from gpupar.parallel.tensor import Conv1DParallel

    gpt2 = _build(GPT2)
    assert hf_tp_plan(gpt2, 2) is None
    traced = {name: (type(style), style.colwise) for name, style in auto_plan(gpt2, torch.zeros(1, 8, dtype=torch.long)).items()}
    assert traced == {f"transformer.h.{i}.mlp.{n}": (Conv1DParallel, n == "c_fc") for i in range(2) for n in ("c_fc", "c_proj")}
    # Pipeline stages cut the decoder layers where they sit (GPT-2's tie of wte and lm_head spans
    # the first and the last stage: each keeps a copy, their gradients summed; tests/pp_tied.py).
    from gpupar.models.hf_pipeline import pipeline_units

    assert pipeline_units(llama) == [["model.embed_tokens", "model.layers.0"],
                                     ["model.layers.1", "model.norm", "lm_head"]]
    assert pipeline_units(gpt2) == [["transformer.wte", "transformer.wpe", "transformer.h.0"],
                                    ["transformer.h.1", "transformer.ln_f", "lm_head"]]
    mistral = _build(("--model", "hf:mistral", "--hf-config", LLAMA[3]))  # Llama's parts, a sliding-window mask
    with pytest.raises(UsageError, match=r"--pp on MistralForCausalLM \(model type 'mistral'\): gpupar cuts the "
                                         r"decoders of gpt2 and llama models"):
        pipeline_units(mistral)
    code, _, err = gpupar_cli("train", *LLAMA, "--strategy", "layer-split", "--devices", "cpu,cpu")
    assert code == 2 and "--strategy layer-split on LlamaForCausalLM: its decoder layers need" in err, err
    code, _, err = gpupar_cli("train", "--model", "user_models:reads_hidden", "--tp", 2, "--nproc-per-node", 2)
    assert code == 2 and "layer fc1's output is also read by mean.dim" in err and len(err.strip().splitlines()) == 1


def test_pipeline_stages_of_hugging_face_decoders_compute_the_models_logits_and_gradients():
    """Three stages of three-layer GPT-2 and Llama decoders (the middle one holds neither the
    embeddings nor the head), chained by hand: the logits and every gradient are the whole
    model's, exactly (tolerance 0: the same operations in the same order on the same values),
    under the whole model's names."""
    from gpupar.config import ParallelConfig
    from gpupar.models.gpt import TokenCrossEntropy
    from gpupar.parallel.pipeline import split_model

    for flags in (GPT2, LLAMA):
        # three layers; GPT-2 untied: a tie's copies get their summed gradient from the Pipeline
        # (StageTies, tests/pp_tied.py), not from stages chained by hand
        hf_config = flags[3].replace("n_layer=2", "n_layer=3,tie_word_embeddings=false").replace(
            "num_hidden_layers=2", "num_hidden_layers=3")
        spec = model_spec(ModelConfig(name=flags[1], hf_config=hf_config, seq_len=16))
        torch.manual_seed(0)
        model = spec.build(0, 0).eval()  # no dropout: the two forwards would draw different masks
        x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
        stages = [module for rank in range(3) for _, module in
                  split_model(model, spec.pipeline_units(model), 3, rank, ParallelConfig(), None, spec.pipeline_stage)]
        hidden = x
        for stage in stages:
            hidden = stage(hidden)
        TokenCrossEntropy()(hidden, y).backward()
        TokenCrossEntropy()(model(x).logits, y).backward()
        torch.testing.assert_close(hidden, model(x).logits, rtol=0, atol=0)
        whole = dict(model.named_parameters(remove_duplicate=False))
        held = [dict(stage.named_parameters()) for stage in stages]
        assert sum(map(len, held)) == len(whole) and not set(held[1]) & {"lm_head.weight"}, [list(h) for h in held]
        for name, p in ((n, p) for h in held for n, p in h.items()):
            torch.testing.assert_close(p.grad, whole[name].grad, rtol=0, atol=0, msg=name)


def _build(flags) -> nn.Module:
    cfg = ModelConfig(name=flags[1], hf_config=flags[3], seq_len=16)
    return model_spec(cfg).build(0, 0)


def test_verify_passes_on_a_resnet_with_batchnorm_and_max_pooling(tmp_path):
    """Max pooling's near-ties flip under rounding (NOTES.md): a correct --sync-bn run must PASS."""
    proc, _ = gpupar("verify", "--model", "user_models:resnet_style", "--features", 192, "--samples", 128,
                     "--epochs", 15, "--sync-bn", "--strategy", "ddp", "--nproc-per-node", 2, "--seed", 42,
                     cwd=tmp_path, timeout=400)
    assert proc.returncode == 0 and PASS.search(proc.stdout), proc.stdout + proc.stderr


def test_plan_covers_hugging_face_models(gpupar_cli):
    """The plan's FLOPs and probes run a Llama forward off real values (its mask code reads
    them: a fake tensor's forward skips those checks), with its own TP plan, and its pipeline
    stages."""
    code, out, err = gpupar_cli("plan", *LLAMA, "--samples", 64, "--nproc-per-node", 2)
    assert code == 0, err
    rows = {re.split(r"\s{2,}", line)[0]: line for line in out.splitlines()
            if line.startswith(("ddp(", "fsdp(", "tp(", "pp("))}
    # pipeline rows probe each stage's own forward (models/hf_pipeline.py)
    assert {"ddp(dp=2)", "fsdp(dp=2)", "tp(2)", "pp(2, 1f1b)"} <= set(rows), rows
    assert all(r.rstrip().endswith("yes") for r in rows.values()), rows


def test_a_token_file_with_ids_beyond_the_vocabulary_is_one_line(gpupar_cli, tmp_path):
    import numpy as np

    (np.arange(5000) % 300).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    code, _, err = gpupar_cli("train", "--model", "hf:gpt2", "--hf-config", GPT2[3], "--data", tmp_path / "tokens.bin",
                              "--seq-len", 16, "--run-dir", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--hf-config vocab_size=256 is too small" in err and "vocab_size=300 or more" in err
    assert not (tmp_path / "r").exists()
    # A token file that fits: GPT-2 and Llama train on it (issue 23's first acceptance item), and
    # learn its one pattern (token t + 1 follows t): in 6 steps the loss falls well below ln(300),
    # the loss of the uniform guess that a freshly initialised model starts near.
    import math

    for flags in (GPT2, LLAMA):
        code, out, err = gpupar_cli("train", *flags[:3], flags[3].replace("vocab_size=256", "vocab_size=300"),
                                    "--data", tmp_path / "tokens.bin", "--seq-len", 16, "--batch-size", 16,
                                    "--max-steps", 6, "--lr", 3e-3, "--run-dir", tmp_path / flags[1][3:])
        final = re.search(r"Final loss: ([\d.]+)", out)
        assert code == 0 and final and float(final[1]) < math.log(300) - 0.15, out + err  # 5.43 and 5.46 here, from 5.72
