"""gpupar bench: a tiny real run (fresh ranks per combination), failures as skipped rows, FLOP counts."""

import json

import pytest
import torch
from torch import nn

from gpupar.bench.driver import run_combination, strategy_config
from gpupar.measure.flops import count_step_flops, gpu_peak_tflops
from gpupar.bench.report import update_markdown
from gpupar.config import Config
from gpupar.errors import UsageError
from gpupar.models import mlp

from harness import env, gpupar

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_bench_writes_json_markdown_and_plots(tmp_path):
    proc, _ = gpupar("bench", "--model", "simple-nn", "--strategies", "single,ddp", "--world-sizes", "1,2",
                     "--steps", 2, "--warmup", 1, "--batch-size", 64, "--peers", "raw", "--out", tmp_path / "B",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "B"
    summary = json.loads((out / "bench.json").read_text())
    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_cores"] >= 1 and env["device_type"] == "cpu"
    assert env["command"].startswith("gpupar bench --model simple-nn")
    assert env["peak_tflops_per_device"] is None and "probe" in env["peak_source"]  # CPU: probed per run
    assert summary["global_batch"] == 64 and summary["flops_per_step"] > 0

    rows = {(r["strategy"], r["world_size"]): r for r in summary["results"]}
    assert set(rows) == {("single", 1), ("single", 2), ("ddp", 1), ("ddp", 2)}
    assert "one device" in rows[("single", 2)]["skipped"]
    for key in (("single", 1), ("ddp", 1), ("ddp", 2)):
        r = rows[key]
        assert "skipped" not in r, r
        assert len(r["step_s"]) == 2 and r["median_step_s"] > 0
        assert r["samples_per_s"] == pytest.approx(64 / r["median_step_s"])
        assert r["achieved_tflops"] == pytest.approx(summary["flops_per_step"] / r["median_step_s"] / 1e12)
        assert r["cpu_probe_tflops"] > 0 and r["mfu"] == pytest.approx(r["achieved_tflops"] / r["cpu_probe_tflops"])
        assert len(r["memory_per_rank_bytes"]) == key[1] and r["peak_memory_per_rank_mib"] > 10
    ddp2 = rows[("ddp", 2)]
    assert ddp2["baseline"] == "ddp x 1"
    assert ddp2["scaling_efficiency"] == pytest.approx(ddp2["samples_per_s"] / (2 * rows[("ddp", 1)]["samples_per_s"]))

    peers = {(r["framework"], r["world_size"]): r for r in summary["peers"]}
    assert set(peers) == {("raw", 2)}  # peers run where there is communication: world > 1
    assert peers[("raw", 2)]["step_vs_raw_torch"] == 1.0
    assert peers[("raw", 2)]["step_vs_gpupar"] == pytest.approx(peers[("raw", 2)]["median_step_s"]
                                                                 / ddp2["median_step_s"])

    report = (out / "report.md").read_text()
    assert "| strategy | world | median step (ms) | samples/s | scaling eff. | TFLOP/s | MFU |" in report
    assert "| single | 2 | – |" in report and "skipped: single runs on one device" in report
    assert "| ddp | 2 | " in report and "| raw | 2 | " in report
    assert report in proc.stdout  # the same tables are printed
    for name in ("throughput.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_a_failing_combination_is_a_skipped_row_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])  # the ranks import user_models from tests/
    base = Config()
    base.model.name, base.train.batch_size = "user_models:fails_on_rank1", 8
    cfg = strategy_config(base, "ddp", 2, steps=3, warmup=1)  # rank 1 raises at its 4th forward
    row = run_combination(cfg, tmp_path / "fail", steps=3, warmup=1)
    assert row == {"skipped": "RuntimeError: injected failure on rank 1"}


def test_combinations_that_cannot_run_say_why():
    with pytest.raises(UsageError, match="single runs on one device"):
        strategy_config(Config(), "single", 4, 5, 1)
    with pytest.raises(UsageError, match="'bogus' is not one of: single, ddp, fsdp, tp, pp"):
        strategy_config(Config(), "bogus", 1, 5, 1)
    cfg = strategy_config(Config(), "ddp", 2, steps=5, warmup=2)
    # One global batch per epoch, so every strategy walks the same batches: 2 + 5 steps.
    assert (cfg.data.samples, cfg.train.batch_size, cfg.train.epochs, cfg.parallel.nproc_per_node) == (1000, 1000, 7, 2)


def test_mlp_flops_match_six_times_weights_times_samples():
    """6 x matmul weights x samples: 2 (forward) + 2 (input gradient) + 2 (weight gradient).

    Autograd skips the input gradient of the first layer (the data need none), so the count
    is exactly 6WB - 2 W_first B; with 10 inputs and 4 layers of width 256 that is within
    1% of 6WB, the stated margin. Bias, ReLU and loss FLOPs are not matmuls and not counted.
    """
    batch, model = 64, mlp(10, 256, 4, 1)
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    x, y = torch.randn(batch, 10), torch.randn(batch, 1)
    flops = count_step_flops(model, x, y, nn.MSELoss())
    assert flops == 6 * weights * batch - 2 * model[0].weight.numel() * batch
    assert 0.99 <= flops / (6 * weights * batch) <= 1.0
    assert model[0].weight.device.type == "cpu" and model[0].weight.grad is None  # counted on a meta copy


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200", "fp16") == 989.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu_peak_tflops("Some Future GPU", "bf16") is None


def test_update_markdown_replaces_only_its_block(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    update_markdown(doc, "cpu", "| a |\n")
    update_markdown(doc, "cpu", "| b |\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- gpupar bench: cpu -->") == 1 and "| b |" in text and "| a |" not in text
