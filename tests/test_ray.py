"""Ray Train's TorchTrainer starts the workers and their process group (gloo, 2 CPU workers on
Ray's local cluster): inside it, gpupar.setup (the classic loop kept as written,
examples/own_loop.py) and gpupar.train join that group and train the one-process weights.

Ray is an optional extra (`pip install gpupar[ray]`, in `[test]` too); this test skips only
where ray is not installed. Ray's own start (its cluster, the train controller, two worker
actors) takes most of the test's time.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpupar.weights import load_weights

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'gpupar[ray]')")
pytest.importorskip("ray.train.torch", reason="ray[train] is not installed (pip install 'gpupar[ray]')")

ROOT = Path(__file__).resolve().parent.parent
OWN_LOOP = ROOT / "examples" / "own_loop.py"


def worker(config: dict) -> None:
    """One Ray Train worker: Ray has set RANK/WORLD_SIZE and started the process group."""
    import torch.distributed as dist
    from torch import nn

    import gpupar
    from gpupar import SimpleNN
    from gpupar.data import synthetic_regression
    from gpupar.weights import save_weights

    group = dist.group.WORLD
    assert group is not None and dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    os.environ["GPUPAR_VERIFY_DIR"] = config["own_loop_dir"]  # rank 0 writes the weights it trained
    runpy.run_path(config["script"], run_name="__main__")
    from gpupar.ownloop import record

    record.flush()
    torch.manual_seed(0)
    X, y = synthetic_regression(1000)
    cfg = gpupar.Config()
    cfg.parallel.strategy, cfg.train.progress = "ddp", False
    result = gpupar.train(SimpleNN(), (X, y), nn.MSELoss(), config=cfg)
    if dist.get_rank() == 0:
        save_weights(result.model.state_dict(), Path(config["train_dir"]) / "model.safetensors")
    assert dist.group.WORLD is group, "gpupar replaced Ray's process group"


def test_ray_torch_trainer_runs_the_own_loop_and_gpupar_train_to_the_one_process_weights(tmp_path, monkeypatch):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import gpupar
    from gpupar import SimpleNN
    from gpupar.data import synthetic_regression
    from gpupar.weights import save_weights

    # One-process references: the example as `python examples/own_loop.py`, and gpupar.train here.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPAR_VERIFY_DIR": str(tmp_path / "own-single"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(OWN_LOOP)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.manual_seed(0)
    X, y = synthetic_regression(1000)
    cfg = gpupar.Config()
    cfg.train.progress = False
    single = gpupar.train(SimpleNN(), (X, y), torch.nn.MSELoss(), config=cfg)
    save_weights(single.model.state_dict(), tmp_path / "train-single" / "model.safetensors")

    for name in ("PYTHONPATH",):  # Ray's workers inherit the driver's environment at ray.init
        monkeypatch.setenv(name, os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get(name, "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GPUPAR_STRATEGY"):
        monkeypatch.delenv(name, raising=False)
    # TorchTrainer.fit installs its own SIGINT handler in this process and leaves it behind;
    # later tests that signal the pytest process need Python's own back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        trainer = TorchTrainer(
            worker, train_loop_config={"script": str(OWN_LOOP), "own_loop_dir": str(tmp_path / "own-ray"),
                                       "train_dir": str(tmp_path / "train-ray")},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"), run_config=RunConfig(storage_path=str(tmp_path / "ray")))
        trainer.fit()
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    # DDP parity tolerance (tests/test_own_loop.py): the 2-way all-reduce's summation order only.
    for run, reference in (("own-ray", "own-single"), ("train-ray", "train-single"), ("own-ray", "train-single")):
        ref, got = (load_weights(tmp_path / d / "model.safetensors") for d in (reference, run))
        assert got.keys() == ref.keys(), (run, reference)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{run} vs {reference}: {key}")
