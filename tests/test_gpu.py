"""CUDA paths: the checks only a GPU can make. Marked ``gpu``; they skip where no CUDA device
is visible (CI), and ``benchmarks/gpu_suite.sh`` runs them on a lent card (``pytest -m gpu``).

One process, in-process CLI and API calls: CUDA starts once. NCCL is checked at world 1
(one card); multi-rank parity is the CPU suite's (gloo), with the same code paths.
"""

import json
import os
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import gpupar
from gpupar.training import graphs
from gpupar.config import Config
from gpupar.data import synthetic_regression
from gpupar.data import as_samples
from gpupar.training.loop import Hooks, fit
from gpupar.training.recipe import make_loss, make_optimizer
from gpupar.topology import Topology

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda", 0)


def _classic(device: str, **train) -> gpupar.TrainResult:
    cfg = Config()
    cfg.train.device, cfg.train.progress = device, False
    for key, value in train.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(42)
    X, y = synthetic_regression()
    return gpupar.train(gpupar.SimpleNN(), (X, y), config=cfg)


def test_auto_picks_cuda_and_the_classic_example_matches_the_cpu_run():
    from gpupar.devices import pick_device

    assert pick_device("auto") == CUDA
    gpu, cpu = _classic("auto"), _classic("cpu")
    assert next(gpu.model.parameters()).device == CUDA
    # Same seed, same data, same arithmetic in float32: cuBLAS and the CPU's GEMMs sum in a
    # different order (~1e-7 relative per op) and 100 Adam steps on this contracting problem
    # keep that far below 1e-3 of the loss (TF32 is off by default for float32 matmuls).
    assert gpu.history.final_loss == pytest.approx(cpu.history.final_loss, rel=1e-3)
    assert gpu.history.final_loss < gpu.history.records[0]["loss"] / 10


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_no_host_sync_between_log_points_on_cuda(on_nan):
    """CUDA's own sync detector (``set_sync_debug_mode``) warns at every call that makes the
    host wait for the GPU; between log points the loop must make none."""
    from user_models import batchnorm_dropout

    cfg = Config()
    cfg.train.progress, cfg.checkpoint.on_nan = False, on_nan
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every = 30, 100, 10  # 2 steps/epoch: log at 20, 40, 60
    cfg.optim.lr_schedule, cfg.optim.warmup_steps, cfg.optim.clip_grad_norm = "cosine", 5, 1.0
    X, y = synthetic_regression(samples=200, seed=3)
    torch.manual_seed(0)
    model = batchnorm_dropout().to(CUDA)
    train_set, _ = as_samples((X, y), cfg)
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            history = fit(model, train_set, cfg, Topology.single(CUDA), make_loss(cfg), make_optimizer(model, cfg),
                          hooks=Hooks(log=lambda _: None, on_step=lambda step: marks.append(len(caught))))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught]
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # syncs after step k, up to step k + 1's end
    busy = {k for k, n in enumerate(per_step, start=1) if n}
    log_steps = {r["step"] for r in history.records}
    assert busy <= log_steps, (per_step, syncs[:3])
    assert history.records[-1]["loss"] < history.records[0]["loss"]


def test_ddp_and_fsdp_over_nccl_equal_the_plain_model():
    """The DDP and FSDP2 wrappers on a one-rank NCCL group: five Adam steps equal the plain
    model's to 1e-6 (at world 1 the all-reduce and the reduce-scatter divide by 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from gpupar.config import ParallelConfig
    from gpupar.parallel.ddp import apply_ddp
    from gpupar.parallel.fsdp import apply_fsdp

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="gpupar-nccl-"), "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=CUDA)
    try:
        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(CUDA)

        x, y = torch.randn(32, 16, device=CUDA), torch.randn(32, 1, device=CUDA)

        def train(m):
            opt = torch.optim.Adam(m.parameters(), lr=0.01, fused=True)
            losses = []
            for _ in range(5):
                loss = nn.functional.mse_loss(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            return torch.stack(losses)

        ref = train(model())
        ddp = train(apply_ddp(model(), Topology.single(CUDA), ParallelConfig()))
        fsdp = train(apply_fsdp(model(), init_device_mesh("cuda", (1,)), ParallelConfig()))
        torch.testing.assert_close(ddp, ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(fsdp, ref, rtol=1e-6, atol=0)
    finally:
        dist.destroy_process_group()


def test_cuda_graphs_train_the_same_model_as_eager():
    """One device: the whole step is one captured graph (graphs.py), replaying the eager
    step's own kernels, so the weights match eager to float32 rounding."""
    eager, graphs = _classic("cuda"), _classic("cuda", cuda_graphs=True)
    assert graphs.history.final_loss == pytest.approx(eager.history.final_loss, rel=1e-5)
    for p, q in zip(eager.model.parameters(), graphs.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "sgd"], "--cuda-graphs captures the optimizer step too: it needs --optimizer adam or adamw"),
    (["--optimizer-impl", "default"], "--optimizer-impl fused (this run: --optimizer adam --optimizer-impl default)"),
    (["--precision", "fp16"], "--cuda-graphs with --precision fp16: the loss scaler reads its scale on the host"),
])
def test_what_a_captured_step_cannot_do_is_one_line(gpupar_cli, tmp_path, flags, message):
    code, _, err = gpupar_cli("train", "--device", "cuda", "--cuda-graphs", *flags, "--run-dir", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_cuda_graphs_capture_a_compiled_model():
    eager, both = _classic("cuda"), _classic("cuda", cuda_graphs=True, compile=True)
    # inductor fuses the element-wise ops and may pick other GEMM kernels: float32 rounding
    # differs per op (~1e-7 relative), which 100 steps of this contracting problem keep < 1e-3
    assert both.history.final_loss == pytest.approx(eager.history.final_loss, rel=1e-3)


def _fit_batchnorm(cuda_graphs: bool, X, y, on_nan="skip"):
    from user_models import batchnorm_dropout

    cfg = Config()
    cfg.train.progress, cfg.checkpoint.on_nan, cfg.train.cuda_graphs = False, on_nan, cuda_graphs
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every = 30, 100, 10
    cfg.optim.lr_schedule, cfg.optim.warmup_steps, cfg.optim.clip_grad_norm = "cosine", 5, 1.0
    torch.manual_seed(0)
    model = batchnorm_dropout().to(CUDA)
    for m in model.modules():  # dropout's masks come from a different RNG stream inside a graph
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    # The bias before BatchNorm has a true gradient of 0 (the norm subtracts it again): its
    # gradient is rounding noise, which Adam turns into full-size steps, so it would differ
    # between any two runs whose reductions round differently (an H200 saw exactly this
    # parameter differ, and the one before it, inp.weight, agree to 1e-5). Frozen here.
    model.inp.bias.requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            history = fit(model, as_samples((X, y), cfg)[0], cfg, Topology.single(CUDA), make_loss(cfg), optimizer,
                          hooks=Hooks(log=lambda _: None, on_step=lambda step: marks.append(len(caught))))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # syncs after step k, up to step k + 1's end
    busy = {k for k, n in enumerate(per_step, start=1) if n}
    # Recording the graph (step WARMUP + 1) synchronizes once: torch.cuda.graph waits for the device.
    allowed = {r["step"] for r in history.records} | ({graphs.WARMUP} if cuda_graphs else set())
    assert busy <= allowed, (per_step, [str(w.message) for w in caught][:3])
    return model, history, float(optimizer.param_groups[0]["lr"])


def test_cuda_graphs_with_batchnorm_schedule_clipping_and_a_nan_batch():
    """Mini-batches copied into the graph's inputs, BatchNorm's running statistics, a cosine
    schedule through the learning-rate tensor, clipping, and one batch of NaN (every epoch's
    second) masked on the device: the captured run takes the eager run's steps, skips the
    same ones and syncs only at log points."""
    X, y = synthetic_regression(samples=200, seed=3)
    X[100:105] = float("nan")  # rows of the second batch of 100
    eager, eager_history, eager_lr = _fit_batchnorm(False, X, y)
    graphs, graphs_history, graphs_lr = _fit_batchnorm(True, X, y)
    assert eager_history.skipped_steps == graphs_history.skipped_steps == list(range(2, 61, 2))
    assert graphs_lr == pytest.approx(eager_lr, rel=1e-6)
    for (name, a), b in zip(eager.state_dict().items(), graphs.state_dict().values()):
        # (BatchNorm's running statistics took the NaN batch's mean in both runs: equal_nan)
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
    assert graphs_history.records[-1]["loss"] < graphs_history.records[0]["loss"]


def test_bf16_autocast_learns_the_classic_example():
    fp32, bf16 = _classic("cuda"), _classic("cuda", precision="bf16")
    # bf16 keeps 8 bits of mantissa: predictions of size ~3 are off by ~1e-2, which adds ~1e-4
    # to an MSE whose floor is the noise's 0.01. A broken autocast (NaN, no learning) is >= 1.
    assert bf16.history.final_loss < 2 * fp32.history.final_loss + 0.01
    assert bf16.model.fc1.weight.dtype == torch.float32  # autocast leaves the master weights in fp32


def test_resume_on_cuda_equals_an_uninterrupted_run_bitwise(gpupar_cli, tmp_path):
    """Weights, Adam state and CUDA RNG state come back from the checkpoint (weights_only)."""
    run, plain = tmp_path / "R", tmp_path / "plain"
    quiet = ("--device", "cuda", "--progress", "false")
    assert gpupar_cli("train", *quiet, "--epochs", 40, "--checkpoint-every", 20, "--run-dir", run)[0] == 0
    code, out, err = gpupar_cli("train", *quiet, "--epochs", 100, "--resume", "auto", "--run-dir", run)
    assert code == 0 and "Resumed from" in out, err
    assert gpupar_cli("train", *quiet, "--run-dir", plain)[0] == 0
    a, b = load_file(str(run / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max gap {(a[name] - b[name]).abs().max():.3g}"


def test_cuda_graphs_checkpoint_and_resume(gpupar_cli, tmp_path):
    """The captured step's optimizer (capturable, a learning-rate tensor) saves and restores:
    a run resumed at step 40 (3 eager steps, then a new capture) ends where an uninterrupted
    captured run ends (the same kernels, eager or replayed)."""
    run, plain = tmp_path / "R", tmp_path / "plain"
    quiet = ("--device", "cuda", "--cuda-graphs", "--progress", "false")
    assert gpupar_cli("train", *quiet, "--epochs", 40, "--checkpoint-every", 20, "--run-dir", run)[0] == 0
    code, out, err = gpupar_cli("train", *quiet, "--epochs", 100, "--resume", "auto", "--run-dir", run)
    assert code == 0 and "Resumed from" in out, err
    assert gpupar_cli("train", *quiet, "--epochs", 100, "--run-dir", plain)[0] == 0
    a, b = load_file(str(run / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_plan_on_cuda_takes_the_card_memory_and_its_runtime_allowance(gpupar_cli):
    code, out, _ = gpupar_cli("plan", "--world-sizes", "1", "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    total = torch.cuda.get_device_properties(0).total_memory
    assert rows and all(r["device_memory"] == total for r in rows)
    assert all(r["runtime"] >= 2**30 for r in rows)  # the CUDA context and libraries: 1 GiB
