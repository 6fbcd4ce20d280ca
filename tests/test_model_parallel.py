"""Model parallelism: topology degrees, tensor and pipeline parallel, layer-split, GPT, 2-D meshes.

Parity runs go through `gpupar verify` (single-device reference vs the strategy on real
gloo ranks). Tolerances: 1e-5 relative in fp32 (verify's default) for pipeline parallel,
which computes the same sums per micro-batch and only adds M micro-batch gradients in
another order; layer-split is exact (the same ops on the same device type). Tensor parallel
sums partial matmuls across ranks (a different reduction order): the loss agrees to ~1e-7,
and parameters after Adam (which divides by the gradient's running RMS, amplifying rounding
in tiny gradients) to ~1e-5 after 100 steps; verify's default with --tp is 1e-4 (see README).
"""

import json
import re
import sys

import pytest
import torch

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.models.gpt import GPT, synthetic_tokens
from gpupar.models import mlp
from gpupar.parallel.pipeline import balanced_starts, layer_units, stage_starts
from gpupar.parallel.tensor import auto_plan, check_tp_divisible
from gpupar.config import layout
from gpupar.topology import ParallelDims

import user_models
from harness import TESTS, gpupar

PASS = re.compile(r"PASS: (.+?) matches the single-device reference within (\S+) relative")
EPOCH = re.compile(r"^Epoch \[(\d+)/(\d+)\], Loss: (\d+\.\d+)", re.M)


# ---- no ranks needed ---------------------------------------------------------------------

def dims(world: int, per_node: int | None = None, **parallel) -> ParallelDims:
    cfg = Config()
    for name, value in parallel.items():
        setattr(cfg.parallel, name, value)
    return ParallelDims.resolve(layout(cfg.validate().parallel), world, per_node or world)


def test_strategy_is_shorthand_for_degrees_and_what_runs_is_named():
    assert dims(4, strategy="ddp") == ParallelDims(dp_replicate=4)
    assert dims(4, strategy="fsdp") == ParallelDims(dp_shard=4)
    assert dims(8, 4, strategy="hsdp") == ParallelDims(dp_replicate=2, dp_shard=4)  # shard within a node
    assert dims(4, strategy="tp") == ParallelDims(tp=4) and dims(4, strategy="pp", dp=2) == ParallelDims(2, 1, 2, 1)
    assert dims(4, tp=2) == ParallelDims(dp_shard=2, tp=2)  # dp takes the rest, sharded beside tp
    assert dims(4, tp=2).describe() == "fsdp(dp=2) x tp(2)"
    assert dims(8, tp=2, pp=2).describe("1f1b") == "pp(2, 1f1b) x fsdp(dp=2) x tp(2)"
    assert dims(8, strategy="hsdp", tp=2, dp_replicate=2).describe() == "hsdp(replicate=2, shard=2) x tp(2)"
    assert dims(2, strategy="ddp").describe() == "ddp(dp=2)" and dims(2, dp=2).ddp_enabled
    with pytest.raises(UsageError, match=r"--dp 3 x --tp 2 x --pp 1 cannot fill the 4 ranks"):
        dims(4, dp=3, tp=2)
    with pytest.raises(UsageError, match="--strategy ddp with --tp 2: DDP cannot hold tensor-parallel"):
        dims(4, strategy="ddp", tp=2)
    with pytest.raises(UsageError, match="--strategy hsdp with --dp-shard 1 beside --tp/--pp only replicates"):
        dims(4, strategy="hsdp", tp=2, dp_shard=1)
    with pytest.raises(UsageError, match="--strategy layer-split runs in one process and takes no --dp/--tp/--pp"):
        dims(4, strategy="layer-split", devices="cpu,cpu", tp=2)


def test_balanced_split_by_parameter_count_and_user_split_points():
    assert balanced_starts([1, 1, 1, 1], 2) == [0, 2]
    assert balanced_starts([10, 1, 1, 1, 1, 1], 2) == [0, 1]  # one heavy layer alone, the rest together
    assert balanced_starts([2, 2, 2, 6], 2) == [0, 3]
    assert balanced_starts([1, 1, 1, 1, 1, 10], 3)[-1] == 5  # the heavy layer alone at the end
    model = mlp(10, 32, 4, 1)
    assert layer_units(model) == [["0", "1"], ["2", "3"], ["4", "5"], ["6"]]  # activations ride along
    units = layer_units(model)
    assert stage_starts(model, units, 2, "3") == [0, 3]
    with pytest.raises(UsageError, match="--pp asks for 5 stages but Sequential has only 4 layers"):
        stage_starts(model, units, 5, None)
    with pytest.raises(UsageError, match=r"--split-points '3,1': need 2 increasing layer indices in 1..3"):
        stage_starts(model, units, 3, "3,1")
    gpt = GPT(layers=3)
    assert GPT.layer_units(gpt) == [["tok_emb", "pos_emb"], ["blocks.0"], ["blocks.1"], ["blocks.2"], ["norm", "head"]]
    # The embeddings and head are small here: the balanced cut puts them beside a block.
    assert stage_starts(gpt, GPT.layer_units(gpt), 2, None) == [0, 2]  # emb+blocks.0 | blocks.1, blocks.2, head


def test_auto_plan_shards_only_what_a_trace_of_the_forward_proves():
    """A colwise layer's output must reach its rowwise partner through elementwise steps only."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    x = torch.zeros(1, 10)
    plan = auto_plan(mlp(10, 32, 5, 1), x)  # Linear at 0, 2, 4, 6, 8: pairs (0, 2), (4, 6); 8 stays whole
    assert {k: type(v) for k, v in plan.items()} == {"0": ColwiseParallel, "2": RowwiseParallel,
                                                     "4": ColwiseParallel, "6": RowwiseParallel}
    with pytest.raises(UsageError, match="does not divide the 33 output features of '0'"):
        check_tp_divisible(mlp(10, 33, 2, 1), auto_plan(mlp(10, 33, 2, 1), x), 2)
    with pytest.raises(UsageError, match="layer 0's output is also read by native_layer_norm"):
        auto_plan(torch.nn.Sequential(torch.nn.Linear(10, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1)), x)
    # A forward that also reads the hidden features whole (their mean) is refused, not trained
    # as another model; in a model with a sound pair beside it, only the pair is sharded.
    with pytest.raises(UsageError, match="layer fc1's output is also read by mean.dim"):
        auto_plan(user_models.ReadsHidden(), x)
    assert set(auto_plan(user_models.partly_shardable(), x)) == {"up", "down"}
    # Each block's up/down pair of a ModuleList model; the input layer (into a LayerNorm) and the
    # head (the model's output) stay whole.
    assert set(auto_plan(user_models.residual_mlp(), x)) == {f"blocks.{i}.{n}" for i in range(4) for n in ("up", "down")}


def test_gpt_learns_the_synthetic_sequence_task(gpupar_cli, tmp_path):
    X, y = synthetic_tokens(4, 6, 10, seed=0)
    assert torch.equal(X[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal((y - X) % 10, ((X[:, 1:2] - X[:, :1]) % 10).expand(-1, 6))  # a constant stride
    code, out, _ = gpupar_cli("train", "--model", "gpt", "--layers", 2, "--hidden", 32, "--samples", 256,
                              "--batch-size", 64, "--epochs", 8, "--log-every", 4, "--run-dir", tmp_path / "g")
    assert code == 0
    summary = json.loads((tmp_path / "g/summary.json").read_text())
    assert summary["tokens_per_s"] == pytest.approx(summary["samples_per_s"] * 32)
    assert "tokens/s" in out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "g/metrics.jsonl").read_text().splitlines()]
    assert losses[1] < 0.75 * losses[0] < 0.75 * 4.16  # chance is ln 64 = 4.16; the task is learnable


def test_layer_split_verify_is_exact_and_bad_devices_are_refused(gpupar_cli, tmp_path):
    code, out, err = gpupar_cli("verify", "--strategy", "layer-split", "--devices", "cpu,cpu", "--model", "mlp",
                                "--layers", 3, "--epochs", 20, "--run-dir", tmp_path / "v")
    assert code == 0, err
    assert PASS.search(out).groups() == ("layer-split", "1e-05")
    ref = json.loads((tmp_path / "v/reference/step_losses.json").read_text())
    assert ref == json.loads((tmp_path / "v/strategy/step_losses.json").read_text())  # bitwise on one CPU
    code, _, err = gpupar_cli("train", "--strategy", "layer-split", "--devices", "cpu")
    assert code == 2 and "layer-split needs at least two devices" in err
    code, _, err = gpupar_cli("train", "--strategy", "layer-split")
    assert code == 2 and "--strategy layer-split needs --devices" in err


def test_layer_split_puts_consecutive_layers_on_the_devices_given():
    from gpupar.parallel.layer_split import apply_layer_split

    model = mlp(10, 8, 4, 1)
    model = apply_layer_split(model, [torch.device("cpu")] * 2, layer_units(model), split_points="1")
    hooked = [name for name, m in model.named_children() if m._forward_pre_hooks]
    assert hooked == ["0", "1", "2", "3", "4", "5", "6"]  # every layer moves its own input
    assert model(torch.rand(5, 10)).shape == (5, 1)


# ---- real ranks --------------------------------------------------------------------------

def test_rank_level_tensor_and_pipeline_checks(tmp_path):
    proc, _ = gpupar("--nproc-per-node", 2, str(TESTS / "mp_ranks.py"), cwd=tmp_path,
                     prefix=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^OK (\S+)", proc.stdout, re.M) == ["mesh", "auto-pairing", "gpt-plan", "user-plan",
                                                           "divisibility", "pipeline-split", "gloo-reduce-scatter",
                                                           "ddp-token-mean", "pp-token-mean",
                                                           "pp-token-mean-with-a-micro-batch-of-padding-only",
                                                           "loss-reads-parameters",
                                                           "tp-loss-sees-the-whole-output", "pipeline-loss-scaler",
                                                           "pp-loss-sees-the-batch", "pp-tied"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b"])
def test_verify_pipeline_every_schedule_world2(tmp_path, schedule):
    proc, _ = gpupar("verify", "--pp", 2, "--schedule", schedule, "--microbatches", 4, "--model", "mlp",
                     "--layers", 4, "--hidden", 32, "--batch-size", 200, "--shuffle", "--epochs", 3,
                     "--nproc-per-node", 2, "--run-dir", tmp_path / "v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASS.search(proc.stdout).groups() == (f"pp(2, {schedule})", "1e-05")


def test_verify_tensor_parallel_world2(tmp_path):
    proc, _ = gpupar("verify", "--tp", 2, "--epochs", 40, "--nproc-per-node", 2, "--run-dir", tmp_path / "v",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASS.search(proc.stdout).groups() == ("tp(2)", "1e-04")  # the default tolerance with --tp
    got = json.loads((tmp_path / "v/strategy/step_losses.json").read_text())
    ref = json.loads((tmp_path / "v/reference/step_losses.json").read_text())
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 1e-5  # the loss itself agrees tightly


@pytest.mark.parametrize("flags,label", [
    (["--pp", 4, "--schedule", "gpipe", "--microbatches", 4, "--layers", 4], "pp(4, gpipe)"),
    (["--tp", 4, "--layers", 2], "tp(4)"),
])
def test_verify_pipeline_and_tensor_parallel_world4(tmp_path, flags, label):
    proc, _ = gpupar("verify", *flags, "--model", "mlp", "--hidden", 32, "--batch-size", 200, "--epochs", 3,
                     "--nproc-per-node", 4, "--run-dir", tmp_path / "v", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASS.search(proc.stdout).groups()[0] == label


def test_verify_dp2_x_tp2_gpt_world4(tmp_path):
    proc, _ = gpupar("verify", "--model", "gpt", "--dp", 2, "--tp", 2, "--hidden", 32, "--samples", 64,
                     "--batch-size", 32, "--epochs", 3, "--nproc-per-node", 4,
                     "--run-dir", tmp_path / "v", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASS.search(proc.stdout).groups() == ("fsdp(dp=2) x tp(2)", "1e-04")


def test_verify_tp2_x_pp2_traced_residual_blocks_world4(tmp_path):
    """A ModuleList of residual blocks is split by tracing; each traced stage's planned layers
    become nn.Linear again and are sharded over the tp pair (rank 0's stage holds inp and
    blocks 0-1: 8,864 parameters whole, 4,704 with up/down halved = 18.4 KiB)."""
    proc, _ = gpupar("verify", "--model", "user_models:residual_mlp", "--tp", 2, "--pp", 2, "--samples", 64,
                     "--batch-size", 32, "--epochs", 3, "--nproc-per-node", 4, "--run-dir", tmp_path / "v",
                     cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASS.search(proc.stdout).groups() == ("pp(2, 1f1b) x tp(2)", "1e-04")
    rank0 = re.search(r"^\s+0\s+(\S+)", proc.stdout, re.M)
    assert rank0 and float(rank0.group(1)) == pytest.approx(4704 * 4 / 1024, abs=0.01), proc.stdout


def test_verify_3d_tp2_x_pp2_gpt_world4(tmp_path):
    """Tensor and pipeline parallel together: each pipeline stage is sharded over its tp pair.
    Clipped by the global norm: TP keeps the GPT's LayerNorms whole, so each stage clips
    DTensor and plain gradients together (torch's clip cannot mix them in one call)."""
    proc, _ = gpupar("verify", "--model", "gpt", "--tp", 2, "--pp", 2, "--layers", 2, "--hidden", 32,
                     "--samples", 64, "--batch-size", 32, "--epochs", 3, "--nproc-per-node", 4, "--clip-grad-norm", 0.5,
                     "--run-dir", tmp_path / "v", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Using device: cpu x 4 ranks: pp(2, 1f1b) x tp(2)" in proc.stdout
    assert PASS.search(proc.stdout).groups() == ("pp(2, 1f1b) x tp(2)", "1e-04")


def test_verify_dp2_x_pp2_world4(tmp_path):
    proc, _ = gpupar("verify", "--dp", 2, "--pp", 2, "--schedule", "1f1b", "--microbatches", 2, "--model", "mlp",
                     "--layers", 4, "--hidden", 32, "--batch-size", 100, "--epochs", 2, "--nproc-per-node", 4,
                     "--run-dir", tmp_path / "v", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASS.search(proc.stdout).groups() == ("pp(2, 1f1b) x fsdp(dp=2)", "1e-05")


def test_gpt_trains_with_pp2_and_saves_the_whole_model(tmp_path):
    proc, _ = gpupar("train", "--model", "gpt", "--pp", 2, "--layers", 2, "--hidden", 32, "--samples", 256,
                     "--batch-size", 64, "--epochs", 6, "--log-every", 2, "--nproc-per-node", 2,
                     "--run-dir", tmp_path / "r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    losses = [float(loss) for _, _, loss in EPOCH.findall(proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0] < 4.2  # falls from about ln(64)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r/model.safetensors"))
    assert saved.keys() == GPT(hidden=32, layers=2).state_dict().keys()  # both stages, unparallelised names


def test_pipeline_usage_errors_before_launch(gpupar_cli, tmp_path):
    code, _, err = gpupar_cli("train", "--pp", 2, "--microbatches", 3, "--batch-size", 100, "--nproc-per-node", 2,
                              "--run-dir", tmp_path / "r")
    assert code == 2 and "--batch-size 100 must be divisible by --grad-accum (1) x data-parallel ranks (1) x " \
                         "--microbatches (3) = 3; try --batch-size 99" in err
    code, _, err = gpupar_cli("train", "--dp", 3, "--tp", 2, "--nproc-per-node", 4, "--run-dir", tmp_path / "r")
    assert code == 2 and "cannot fill the 4 ranks" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,message", [
    (["--tp", 3, "--nproc-per-node", 3], "--tp 3 does not divide the 50 output features of 'fc1'"),
    (["--model", "mlp", "--layers", 2, "--pp", 4, "--nproc-per-node", 4],
     "--pp asks for 4 stages but Sequential has only 2 layers"),
    (["--strategy", "ddp", "--nproc-per-node", 2, "--batch-size", 33],
     "--batch-size 33 must be divisible by --grad-accum (1) x data-parallel ranks (2) = 2; try --batch-size 32"),
    (["--strategy", "ddp", "--nproc-per-node", 64],  # the suggestion fits the 1000 samples (not 1024)
     "the full batch of 1000 samples must be divisible by --grad-accum (1) x data-parallel ranks (64) = 64; "
     "try --batch-size 960"),
    (["--strategy", "ddp", "--tp", 2, "--dp", 2, "--nproc-per-node", 4, "--model", "mlp", "--hidden", 64],
     "--strategy ddp with --tp 2: DDP cannot hold tensor-parallel (DTensor) parameters"),
    # A tie across pipeline stages trains (one copy a stage, gradients summed), but under --tp its
    # copies must be sharded alike for their local shards to add up.
    (["--model", "user_models:tied_pair", "--pp", 2, "--tp", 2, "--nproc-per-node", 4],
     "--tp: '2.weight' and '4.weight' are one tied parameter but the tensor-parallel plan shards their modules "
     "differently (ColwiseParallel, RowwiseParallel); give both modules the same style (with --pp, each stage's "
     "copy of a tie must be sharded alike)"),
    (["--model", "user_models:halved_blocks", "--pp", 2, "--tp", 2, "--nproc-per-node", 4],
     "--tp with --pp: the traced stage's 'blocks.0.up' runs mul, linear, not one linear on its own weight"),
    (["--model", "user_models:tied_pair", "--tp", 2, "--nproc-per-node", 2],
     "--tp: '2.weight' and '4.weight' are one tied parameter but the tensor-parallel plan shards their modules "
     "differently (ColwiseParallel, RowwiseParallel)"),
])
def test_layout_errors_are_one_line_before_any_rank_starts(gpupar_cli, tmp_path, flags, message):
    code, out, err = gpupar_cli("train", *flags, "--run-dir", tmp_path / "r")
    assert code == 2 and err.startswith("gpupar: error: ") and message in err, err
    assert err.count("\n") == 1 and "[rank" not in err  # one line, from the launcher, not from ranks
    assert not (tmp_path / "r").exists()  # nothing written


def test_too_many_cpu_ranks_per_core_is_a_warning_after_the_checks(monkeypatch, capsys):
    from gpupar import launch

    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    cfg = Config()
    cfg.parallel.strategy, cfg.parallel.nproc_per_node, cfg.data.samples = "ddp", 9, 990
    assert launch.check(cfg.validate()).degrees == ParallelDims(dp_replicate=9).degrees  # checked, not refused
    assert "9 CPU ranks on 2 cores will crawl" in capsys.readouterr().err
