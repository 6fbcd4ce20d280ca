"""Pipeline parallel without exceptions (issue 25): the layer finder that looks inside a model,
and the classic example's own model split across devices and pipeline stages again.

Parity runs go through `gpupar verify` (single-device reference against the layout on real
ranks): layer-split is the same ops on one device type (bitwise); a pipeline only reorders
the sum of the micro-batch gradients, so verify's default 1e-5 relative holds (README, Parity).
"""

import json
import re

import pytest
import torch
from torch import nn

from gpupar.errors import UsageError
from gpupar.models import SimpleNN
from gpupar.parallel.pipeline import layer_units

import user_models
from harness import gpupar

PASS = re.compile(r"PASS: (.+?) matches the single-device reference within (\S+) relative")


class ClassicSequential(nn.Module):
    """The classic example as often written: its layers in one nn.Sequential attribute."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))

    def forward(self, x):
        return self.layer(x)


def test_the_layer_finder_looks_inside_the_model():
    assert layer_units(SimpleNN()) == [["fc1", "relu"], ["fc2"]]  # flat children: split between them
    assert layer_units(ClassicSequential()) == [["layer.0", "layer.1"], ["layer.2"]]
    assert layer_units(user_models.ResidualMLP(blocks=3)) == [["inp", "blocks.0"], ["blocks.1"],
                                                              ["blocks.2", "head"]]
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    # Two attributes down (model.layers); what sits beside the list at each level rides along.
    assert layer_units(llama) == [["model.embed_tokens", "model.layers.0"], ["model.layers.1"],
                                  ["model.layers.2", "model.norm", "model.rotary_emb", "lm_head"]]
    with pytest.raises(UsageError, match=r"ResNetStyle has 2 lists of blocks \(stem, layer1\)"):
        layer_units(user_models.ResNetStyle())
    with pytest.raises(UsageError, match="GoesNaN has no list of blocks"):
        layer_units(user_models.GoesNaN())


def test_pipeline_batches_are_inputs_and_targets_or_one_line():
    """The schedule feeds one tensor to the first stage: a pair or an {"x", "y"} dict goes in,
    a keyword batch (a Hugging Face dict) and micro-batches that do not divide are one line."""
    from gpupar.training.step import pipeline_batch

    x, y = torch.zeros(4, 3), torch.ones(4)
    for batch in ((x, y), [x, y], {"x": x, "y": y}):
        got = pipeline_batch(batch, 2)
        assert got[0] is x and got[1] is y
    with pytest.raises(UsageError, match=r"^--pp feeds \(inputs, targets\) tensors .* a dict of input_ids, labels "):
        pipeline_batch({"input_ids": x, "labels": y}, 2)
    with pytest.raises(UsageError, match=r"--microbatches 3 must divide each rank's batch of 4 samples"):
        pipeline_batch((x, y), 3)


def test_the_classic_model_splits_across_devices_and_stages(gpupar_cli, tmp_path):
    # The README's command, on the default model (the classic SimpleNN itself).
    code, out, err = gpupar_cli("verify", "--strategy", "layer-split", "--devices", "cpu,cpu",
                                "--epochs", 20, "--run-dir", tmp_path / "ls")
    assert code == 0, err
    assert PASS.search(out).groups() == ("layer-split", "1e-05")
    code, out, err = gpupar_cli("verify", "--pp", 2, "--nproc-per-node", 2, "--epochs", 20,
                                "--run-dir", tmp_path / "pp")
    assert code == 0, err
    assert PASS.search(out).groups() == ("pp(2, 1f1b)", "1e-05")


@pytest.mark.parametrize("flags", [
    # The clip (0.05) is below the gradient norm, so it scales every step: with each stage's own
    # norm instead of the whole model's, this run FAILs at step 4 (20x the rounding band).
    ("--pp", 2, "--nproc-per-node", 2, "--clip-grad-norm", 0.05),
    # Within a stage the norm also spans the FSDP shards (DTensor gradients) of dp 2.
    ("--model", "mlp", "--layers", 4, "--dp", 2, "--pp", 2, "--nproc-per-node", 4, "--clip-grad-norm", 0.05),
    # bf16 autocast through the schedule, fp32 master weights: verify's bf16 tolerance (2e-2).
    ("--pp", 2, "--nproc-per-node", 2, "--precision", "bf16"),
    # fp16 autocast likewise (on a GPU its loss scaler's Inf check spans every stage:
    # mp_ranks.py's pipeline-loss-scaler; on the CPU, as on one CPU device, no scaler).
    ("--pp", 2, "--nproc-per-node", 2, "--precision", "fp16"),
    # --grad-accum 2: two rounds of the schedule per optimizer step; the loss and the step-1
    # gradients are the whole batch's mean (a missing 1/rounds fails step 1's loss by 2x).
    ("--pp", 2, "--nproc-per-node", 2, "--grad-accum", 2, "--batch-size", 400),
    # The GPT: bf16, the global clip (0.1, below its step-1 norm of 0.4) and a validation split (2e-2: bf16's).
    ("--model", "gpt", "--samples", 80, "--batch-size", 32, "--pp", 2, "--nproc-per-node", 2, "--precision", "bf16",
     "--clip-grad-norm", 0.1, "--val-fraction", 0.2),
], ids=["clip-pp2", "clip-dp2xpp2", "bf16-pp2", "fp16-pp2", "accum-pp2", "gpt-bf16-clip-val"])
def test_pipeline_clips_by_the_global_norm_trains_in_bf16_and_accumulates(gpupar_cli, tmp_path, flags):
    code, out, err = gpupar_cli("verify", *flags, "--epochs", 3 if "gpt" in flags else 10, "--run-dir", tmp_path / "v")
    assert code == 0, err
    layout, tolerance = PASS.search(out).groups()
    assert layout.startswith("pp(2, 1f1b)") and tolerance == ("2e-02" if {"bf16", "fp16"} & set(flags) else "1e-05")


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_pipeline_checkpoints_resume_bitwise_reshard_and_export(gpupar_cli, tmp_path, monkeypatch):
    """Each stage saves its part through DCP under the whole model's names. Tolerances: the same
    layout resumes bit for bit; another layout only changes the summation order of the
    micro-batch (or per-rank) gradients from the resumed step on: 1e-6 absolute on weights of
    size ~0.1-1 after 20 steps (measured 3e-8)."""
    flags = ("--model", "user_models:killable_stages", "--epochs", 8, "--batch-size", 200, "--shuffle")
    pp = ("--pp", 2, "--nproc-per-node", 2)
    full, fsdp = tmp_path / "full", tmp_path / "fsdp"
    assert gpupar_cli("train", *flags, *pp, "--checkpoint-every", 20, "--run-dir", full)[0] == 0
    # Same layout, killed: rank 1 SIGKILLs itself at its 100th stage forward (4 micro-batches a
    # step: about step 25 of 40); the restart resumes from step 20 to the same weights, bit for bit.
    monkeypatch.setenv("TEST_KILL_RANK1_AT", "100")
    proc, _ = gpupar("train", *flags, *pp, "--checkpoint-every", 20, "--max-restarts", 1,
                     "--run-dir", tmp_path / "same", cwd=tmp_path)  # a subprocess: rank 0's log is its stdout
    monkeypatch.delenv("TEST_KILL_RANK1_AT")
    assert proc.returncode == 0, proc.stderr
    assert "step-20 at step 20 (saved by pp(2) on 2 rank(s))" in proc.stdout, proc.stdout
    whole = _weights(full)
    assert all(torch.equal(whole[k], v) for k, v in _weights(tmp_path / "same").items())
    # pp 2 -> one device, from step 20 (a fresh run would match too: the log says it resumed).
    code, out, err = gpupar_cli("train", *flags, "--resume", full / "checkpoints/step-20", "--run-dir", tmp_path / "one")
    assert code == 0 and "at step 20 (saved by pp(2) on 2 rank(s))" in out, err
    for name, value in _weights(tmp_path / "one").items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=1e-6)
    # pp 2 -> ddp 2 (each rank loads the whole model and the whole optimizer state).
    code, out, err = gpupar_cli("train", *flags, "--strategy", "ddp", "--nproc-per-node", 2,
                                "--resume", full / "checkpoints/step-20", "--run-dir", tmp_path / "ddp")
    assert code == 0, err
    assert json.loads((tmp_path / "ddp/summary.json").read_text())["resumed_at_step"] == 20
    for name, value in _weights(tmp_path / "ddp").items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=1e-6)
    # fsdp 2 -> pp 2.
    assert gpupar_cli("train", *flags, "--strategy", "fsdp", "--nproc-per-node", 2, "--checkpoint-every", 20,
                      "--run-dir", fsdp)[0] == 0
    proc, _ = gpupar("train", *flags, *pp, "--resume", fsdp / "checkpoints/step-20", "--run-dir", tmp_path / "f2p",
                     cwd=tmp_path)
    assert proc.returncode == 0 and "saved by fsdp(dp=2) on 2 rank(s)" in proc.stdout, proc.stderr
    for name, value in _weights(tmp_path / "f2p").items():
        torch.testing.assert_close(value, _weights(fsdp)[name], rtol=0, atol=1e-6)
    # export of a pp checkpoint: the whole model.
    out_file = tmp_path / "export/model.safetensors"
    assert gpupar_cli("export", "--checkpoint", full / "checkpoints/step-40", "--out", out_file)[0] == 0
    from safetensors.torch import load_file

    exported = load_file(str(out_file))
    assert sorted(exported) == sorted(whole) and all(torch.equal(exported[k], whole[k]) for k in whole)


def _val_losses(run):
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "event" not in r]  # not the memory records


@pytest.mark.parametrize("flags", [
    ("--model", "user_models:residual_mlp"),  # stages cut from the traced forward
    ("--model", "mlp", "--layers", 4, "--schedule", "zbv"),  # 4 stages on 2 ranks in a V (stages 1, 2 on rank 1)
], ids=["traced", "zbv"])
def test_pipeline_validation_loss_equals_one_device(gpupar_cli, tmp_path, flags):
    """The validation forward walks the stages (any number of rows: 100 here, not a multiple of
    the micro-batch); its loss is the single device's up to the training's summation-order
    rounding (1e-5 relative; the two runs' weights differ by ~1e-7)."""
    common = (*flags, "--epochs", 20, "--val-fraction", 0.1)
    proc, _ = gpupar("train", *common, "--pp", 2, "--nproc-per-node", 2, "--run-dir", tmp_path / "pp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert gpupar_cli("train", *common, "--run-dir", tmp_path / "one")[0] == 0
    pp, one = _val_losses(tmp_path / "pp"), _val_losses(tmp_path / "one")
    assert len(pp) == len(one) >= 1
    torch.testing.assert_close(pp, one, rtol=1e-5, atol=0)


@pytest.mark.parametrize("schedule,model", [
    # The GPT's default 2 blocks make the V's 4 stages: embeddings | block | block | norm + head.
    ("zbv", ("--model", "gpt", "--samples", 64, "--batch-size", 32, "--epochs", 3)),
    ("dualpipev", ("--model", "gpt", "--samples", 64, "--batch-size", 32, "--epochs", 3)),
    ("interleaved-zb", ("--model", "mlp", "--layers", 4, "--hidden", 32, "--batch-size", 200, "--epochs", 2)),
], ids=["zbv-gpt", "dualpipev-gpt", "interleaved-zb-mlp"])
def test_zero_bubble_schedules_verify(gpupar_cli, tmp_path, schedule, model):
    """torch's zero-bubble schedules (split input/weight backward; ZBV and DualPipeV in a V, whose
    last stage is on rank 0): the same sums as 1f1b in another order, verify's 1e-5."""
    code, out, err = gpupar_cli("verify", *model, "--pp", 2, "--schedule", schedule, "--microbatches", 4,
                                "--nproc-per-node", 2, "--run-dir", tmp_path / "v")
    assert code == 0, err
    assert PASS.search(out).groups() == (f"pp(2, {schedule})", "1e-05")


@pytest.mark.parametrize("flags,message", [
    (("--layers", 6, "--schedule", "zbv", "--stages-per-rank", 3), "--schedule zbv places exactly 2 stages per rank"),
    (("--layers", 4, "--schedule", "dualpipev", "--microbatches", 2, "--batch-size", 200),
     "--schedule dualpipev needs at least as many --microbatches as stages (4); got 2"),
    (("--layers", 4, "--schedule", "interleaved-zb", "--microbatches", 5, "--batch-size", 200),
     "M // pp = 2 rounds, which must divide --microbatches 5; use e.g. --microbatches 4"),
], ids=["zbv-stages", "dualpipev-microbatches", "interleaved-rounds"])
def test_what_a_schedule_needs_is_one_line(gpupar_cli, tmp_path, flags, message):
    code, _, err = gpupar_cli("train", "--model", "mlp", *flags, "--pp", 2, "--nproc-per-node", 2,
                              "--run-dir", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and message in err, err
