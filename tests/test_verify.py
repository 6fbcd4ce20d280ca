"""gpupar verify's calibrated verdict, --sync-bn, pipelines of ModuleList models, the Python API.

The verdict (gpupar/parity/verdict.py): a strict step 1 (loss 1e-6, gradients 1e-5 relative), then
every step within 10x the run's own rounding noise (a single-device reference whose initial
weights are one ulp off) or under the old fixed tolerance. One spawned run (mp_verify.py)
checks that every injected bug FAILs and every chaotic-but-correct layout PASSes.
"""

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.parallel.pipeline import layer_units, stage_starts
from gpupar.parity.verdict import Trajectory, judge, judge_fixed, report
from gpupar.parity import model_notes

from harness import TESTS, gpupar
from user_models import ResidualMLP

OK = re.compile(r"^OK (\S+)", re.M)


def test_injected_bugs_fail_and_chaotic_but_correct_runs_pass(tmp_path):
    proc, _ = gpupar("--nproc-per-node", 2, str(TESTS / "mp_verify.py"), cwd=tmp_path,
                     prefix=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert OK.findall(proc.stdout) == [
        "ddp-chaotic", "fsdp-chaotic", "bug-grads-summed", "bug-rank1-not-averaged", "bug-overlapping-shards",
        "bug-shifted-shards", "bug-param-not-synced", "ddp-grad-accum", "bug-grad-accum-undivided",
        "bug-rank1-forward-1e-4", "tp-correct-plan", "bug-tp-wrong-plan", "tied-ddp", "tied-fsdp", "tied-tp"]
    # Each FAIL says why: step 1 (what and where), or the step that left the band and the parameter.
    assert "FAIL: bug-param-not-synced differs from the reference at step 1, before rounding can grow: gradient " \
           "of 'blocks.2.up.bias'" in proc.stdout
    assert re.search(r"FAIL: bug-rank1-not-averaged leaves the rounding band at step \d+: .* parameter most "
                     r"responsible: '[\w.]+'", proc.stdout)


def _trajectory(losses, w=1.0, g=1.0):
    return Trajectory(losses, {"w": torch.tensor([w, 2.0])}, {"w": torch.tensor([g, 1.0])})


def test_verdict_band_follows_the_noise_and_step1_is_strict():
    ref = _trajectory([10.0, 5.0, 8.0, 2.0])
    noise = _trajectory([10.0, 5.0 * (1 + 1e-7), 8.0 * (1 + 1e-3), 2.0 * (1 + 1e-5)], w=1.0001)
    # Grown to 5e-3 at step 3 (5x the noise's 1e-3): rounding growth, PASS; the band keeps the
    # noise's running maximum, so step 4 (noise dipped to 1e-5) may stay at 5e-3.
    grown = _trajectory([10.0, 5.0, 8.0 * (1 + 5e-3), 2.0 * (1 + 5e-3)], w=1.0004)
    verdict = judge(ref, noise, grown, floor=1e-5, band=10)
    assert verdict.passed, report(verdict)
    assert "max ratio 5 at step 3" in report(verdict)
    assert judge_fixed(ref, grown, 1e-5).first_diverging_step == 3  # a fixed tolerance calls it a bug
    # 1e-3 at step 2, where the noise is 1e-7: beyond 10x the floor of 1e-5, FAIL at step 2.
    early = _trajectory([10.0, 5.0 * (1 + 1e-3), 8.0, 2.0])
    verdict = judge(ref, noise, early, floor=1e-5, band=10)
    assert not verdict.passed and verdict.first_diverging_step == 2
    assert "leaves the rounding band at step 2" in report(verdict).splitlines()[-1]
    # Step 1: a gradient 1e-4 off fails even though every loss matches.
    verdict = judge(ref, noise, _trajectory(ref.losses, g=1.0001), floor=1e-5, band=10)
    assert not verdict.passed and "at step 1" in report(verdict) and "gradient of 'w'" in report(verdict)


def test_notes_for_batchnorm_without_sync_bn_and_for_dropout():
    cfg = Config()
    cfg.model.name = "user_models:batchnorm_mlp"
    (note,) = model_notes(cfg, dp=2)
    assert "per-rank batch statistics" in note and "--sync-bn" in note
    cfg.parallel.sync_bn = True
    assert model_notes(cfg, dp=2) == []
    cfg.model.name = "user_models:dropout_mlp"
    (note,) = model_notes(cfg, dp=2)
    assert "cannot match across a different batch split" in note and "--no-dropout" in note
    assert model_notes(cfg, dp=2, no_dropout=True) == []


def test_modulelist_layers_and_split_points_by_name():
    model = ResidualMLP(blocks=4, norm=torch.nn.BatchNorm1d)  # children: inp, bn, blocks, head
    units = layer_units(model)
    assert units == [["inp", "bn", "blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3", "head"]]
    assert stage_starts(model, units, 3, "blocks.2,blocks.3") == [0, 2, 3]
    assert stage_starts(model, units, 2, "2") == [0, 2]  # layer indices still work
    assert stage_starts(model, units, 2, None) == [0, 2]  # balanced: equal blocks
    with pytest.raises(UsageError, match="'head' does not start a layer of ResidualMLP"):
        stage_starts(model, units, 2, "head")


def test_unsplittable_model_is_one_line_before_launch(gpupar_cli, tmp_path):
    code, _, err = gpupar_cli("train", "--pp", 2, "--nproc-per-node", 2, "--model", "user_models:resnet_style",
                              "--features", 192, "--run-dir", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and "ResNetStyle has 2 lists of blocks (stem, layer1)" in err
    assert not (tmp_path / "r").exists()
    code, _, err = gpupar_cli("train", "--pp", 2, "--nproc-per-node", 2, "--model", "user_models:branchy",
                              "--run-dir", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and "--pp: cannot trace Branchy's forward" in err
    assert not (tmp_path / "r").exists()


def test_batchnorm_trains_and_verify_with_sync_bn_passes_under_ddp(gpupar_cli, tmp_path):
    code, out, err = gpupar_cli("train", "--model", "user_models:batchnorm_mlp", "--epochs", 3,
                                "--run-dir", tmp_path / "t")
    assert code == 0, err
    proc, _ = gpupar("verify", "--strategy", "ddp", "--sync-bn", "--nproc-per-node", 2, "--model",
                     "user_models:batchnorm_mlp", "--batch-size", 250, "--shuffle", "--epochs", 2,
                     "--run-dir", tmp_path / "v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS: ddp(dp=2) matches the single-device reference" in proc.stdout
    # The running statistics are compared too, and matched: they came from the global batch.
    ref = load_file(str(tmp_path / "v/reference/model.safetensors"))
    got = load_file(str(tmp_path / "v/strategy/model.safetensors"))
    assert not torch.equal(ref["bn.running_mean"], torch.zeros(32))
    torch.testing.assert_close(got["bn.running_var"], ref["bn.running_var"], rtol=1e-5, atol=1e-6)


def test_verify_pipeline_of_input_modulelist_head_model(tmp_path):
    proc, _ = gpupar("verify", "--pp", 2, "--microbatches", 4, "--nproc-per-node", 2, "--model",
                     "user_models:residual_mlp", "--split-points", "blocks.2", "--samples", 128, "--epochs", 8,
                     "--run-dir", tmp_path / "v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"PASS: pp\(2, 1f1b\) matches the single-device reference .* step-1 loss matches",
                     proc.stdout)


def test_torchrun_script_calling_gpupar_train_with_ddp_matches_the_cli(tmp_path):
    example = TESTS.parent / "examples" / "train_ddp.py"
    proc, _ = gpupar("--nproc-per-node", 2, example, "--epochs", 6, "--out", tmp_path / "api.safetensors",
                     cwd=tmp_path, prefix=("-m", "torch.distributed.run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import os

    os.environ["PYTHONPATH"] = f"{example.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try:
        cli, _ = gpupar("train", "--strategy", "ddp", "--nproc-per-node", 2, "--model", "train_ddp:build",
                        "--epochs", 6, "--run-dir", tmp_path / "cli", cwd=tmp_path)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    assert cli.returncode == 0, cli.stderr
    api, ref = load_file(str(tmp_path / "api.safetensors")), load_file(str(tmp_path / "cli/model.safetensors"))
    assert api.keys() == ref.keys()
    for name in ref:  # the same layout, loop, data and seed: the same arithmetic, bit for bit
        assert torch.equal(api[name], ref[name]), name
    assert not math.isnan(float(re.search(r"final loss (\S+);", proc.stdout).group(1)))
