"""MLOps: TensorBoard and MLflow tracking read back with the real libraries, the notebook
launcher, run listing and loss plots, and the example notebook executed top to bottom."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from harness import gpupar as gpupar_process

REPO = Path(__file__).parent.parent


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]  # skip the per-rank memory rows


def test_tensorboard_event_file_holds_loss_lr_throughput_and_memory(gpupar_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    code, out, err = gpupar_cli("train", "--track", "tensorboard", "--run-dir", run, "--epochs", 20,
                                "--log-every", 5, "--val-fraction", 0.2)
    assert code == 0, err
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss/train", "loss/val", "lr", "throughput/samples_per_s",
                                             "memory/peak_mb"}
    records = _metrics(run)
    loss = events.Scalars("loss/train")
    assert [e.step for e in loss] == [r["step"] for r in records] == [5, 10, 15, 20]
    # TensorBoard stores float32: equal to metrics.jsonl to float32 rounding (~6e-8 relative).
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.value for e in events.Scalars("loss/val")] == pytest.approx([r["val_loss"] for r in records], rel=1e-6)
    assert all(e.value == pytest.approx(0.01) for e in events.Scalars("lr"))
    assert all(e.value > 0 for e in events.Scalars("throughput/samples_per_s"))
    assert all(e.value > 10 for e in events.Scalars("memory/peak_mb"))  # a Python process with torch: > 10 MiB


def test_mlflow_run_has_config_params_step_metrics_and_artifacts(gpupar_cli, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db (artifacts in ./mlruns)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = gpupar_cli("train", "--track", "mlflow", "--run-dir", "runs/ml", "--epochs", 30,
                              "--log-every", 10, "--lr", 0.02)
    assert code == 0, err
    assert (tmp_path / "mlflow.db").is_file()
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    runs = mlflow.search_runs(experiment_names=["gpupar"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.02" and params["train.epochs"] == "30" and params["model.name"] == "simple-nn"
    assert params["track.track"] == "mlflow" and "train.batch_size" not in params  # None fields are left out
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    records = _metrics(tmp_path / "runs/ml")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-12)) for r in records]
    assert {"lr", "samples_per_s", "memory_peak_mb", "final_loss", "wall_time_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.toml", "model.safetensors"} <= artifacts


def test_mlflow_with_ddp_logs_once_from_rank_0_and_a_failed_run_is_marked_failed(gpupar_cli, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    proc, _ = gpupar_process("train", "--strategy", "ddp", "--nproc-per-node", 2, "--track", "mlflow",
                             "--mlflow-uri", uri, "--experiment", "ddp-test", "--epochs", 10, "--log-every", 5,
                             "--run-dir", tmp_path / "ddp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    code, _, err = gpupar_cli("train", "--model", "user_models:goes_nan", "--track", "mlflow", "--mlflow-uri", uri,
                              "--experiment", "ddp-test", "--run-dir", tmp_path / "nan")
    assert code == 1 and "non-finite" in err
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["ddp-test"], output_format="list")
    assert sorted(r.info.run_name for r in found) == ["ddp", "nan"]  # one run for two ranks: only rank 0 tracks
    runs = {r.info.run_name: r for r in found}
    assert runs["ddp"].info.status == "FINISHED" and runs["ddp"].data.params["parallel.strategy"] == "ddp"
    assert runs["ddp"].data.metrics["loss"] == pytest.approx(_metrics(tmp_path / "ddp")[-1]["loss"], rel=1e-12)
    assert runs["nan"].info.status == "FAILED"


def test_a_store_call_that_fails_or_never_returns_is_one_warning_and_costs_at_most_the_timeout():
    """The bound lives in Background, whatever the store: a call that never returns costs the
    caller nothing, and the end waits at most the timeout; a failing call drops the rest."""
    import threading

    from gpupar.tracking import Background

    warned, never = [], threading.Event()
    stuck = Background("store", 0.5, warned.append)
    start = time.monotonic()
    for _ in range(100):
        stuck.submit(never.wait)  # a socket that never answers
    assert time.monotonic() - start < 0.2  # the training loop did not wait
    stuck.drain()
    assert 0.5 <= time.monotonic() - start < 2.0
    assert warned == ["gpupar: warning: store: no answer within --track-timeout 0.5 s; tracking stopped, "
                      "training goes on (metrics.jsonl has every record)"]
    never.set()

    warned.clear()
    done = []
    failing = Background("store", 5.0, warned.append)
    failing.submit(done.append, 1)
    failing.submit(lambda: 1 / 0)  # a refused connection, an HTTP 500
    failing.submit(done.append, 2)
    failing.drain()
    assert done == [1] and len(warned) == 1 and "ZeroDivisionError" in warned[0]


def test_mlflow_server_that_never_answers_or_refuses_costs_one_warning_and_the_run_saves(gpupar_cli, tmp_path):
    import socket

    silent = socket.socket()  # accepts the TCP connection (the kernel's backlog) and never replies
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    try:
        for name, port in (("silent", silent.getsockname()[1]), ("refused", refused_port)):
            start = time.monotonic()
            code, _, err = gpupar_cli("train", "--track", "mlflow", "--mlflow-uri", f"http://127.0.0.1:{port}",
                                      "--track-timeout", 1, "--epochs", 5, "--samples", 64,
                                      "--run-dir", tmp_path / name)
            assert code == 0, err
            assert err.count("\n") == 1 and err.startswith(f"gpupar: warning: --track mlflow http://127.0.0.1:{port}")
            assert (tmp_path / name / "model.safetensors").is_file()
            assert time.monotonic() - start < 30  # mlflow's own retries alone took ~90 s
    finally:
        silent.close()
    code, _, err = gpupar_cli("train", "--track", "mlflow", "--mlflow-uri", "bogus://x", "--run-dir", tmp_path / "b")
    assert code == 2 and err.count("\n") == 1 and "'bogus://x'" in err and "http://" in err
    assert not (tmp_path / "b").exists()  # refused before the run directory was claimed


@pytest.mark.parametrize("track,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_extra_is_one_line_with_the_pip_command(gpupar_cli, tmp_path, monkeypatch, track, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    code, out, err = gpupar_cli("train", "--track", track, "--run-dir", tmp_path / "r")
    assert code == 2
    assert err == f"gpupar: error: --track {track} needs the {track} extra: pip install 'gpupar[{track}]'\n"
    assert not (tmp_path / "r").exists()  # stopped before training


def test_notebook_launch_returns_rank_0_result_and_names_the_failing_rank():
    import torch
    import torch.distributed as dist

    from gpupar import notebook_launch
    from gpupar.errors import TrainingError

    # Defined inside the test, like a notebook cell's function: only fork can run it.
    def all_reduce_ranks(offset):
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + offset)])
        dist.all_reduce(t)
        result = (dist.get_rank(), dist.get_world_size(), t.item())
        dist.destroy_process_group()
        return result

    assert notebook_launch(all_reduce_ranks, 10, nproc=3) == (0, 3, 33.0)  # (0+10)+(1+10)+(2+10)

    def fails_on_rank_1():
        if os.environ["RANK"] == "1":
            raise ValueError("injected failure on rank 1")
        time.sleep(60)  # the launcher must stop this rank, not wait for it

    start = time.perf_counter()
    with pytest.raises(TrainingError, match=r"^rank 1 failed: ValueError: injected failure on rank 1; "
                                            r"the other ranks were stopped$"):
        notebook_launch(fails_on_rank_1, nproc=2)
    assert time.perf_counter() - start < 30


def test_runs_lists_past_runs_and_report_draws_a_legible_png(gpupar_cli, tmp_path):
    import matplotlib.image

    root = tmp_path / "runs"
    assert gpupar_cli("train", "--run-dir", root / "a", "--epochs", 20, "--log-every", 5)[0] == 0
    assert gpupar_cli("train", "--run-dir", root / "b", "--model", "mlp", "--epochs", 10, "--val-fraction", 0.2,
                      "--log-every", 2)[0] == 0
    (root / "crashed").mkdir()
    (root / "crashed" / "config.toml").write_text('[model]\nname = "simple-nn"\n')
    code, out, err = gpupar_cli("runs", "--run-root", root)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["run", "date", "model", "strategy", "ranks", "final", "loss", "wall", "time", "status"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    final_a = json.loads((root / "a/summary.json").read_text())["final_loss"]
    assert rows["a"][3:7] == ["simple-nn", "single", "1", f"{final_a:.4f}"] and rows["a"][-1] == "finished"
    assert rows["b"][3] == "mlp"
    assert rows["crashed"][-2:] == ["no", "summary"]

    code, out, err = gpupar_cli("report", root / "b")
    assert code == 0, err
    assert out == f"Wrote the loss curve to {root / 'b' / 'loss.png'}\n"
    image = matplotlib.image.imread(str(root / "b" / "loss.png"))
    assert image.shape[:2] == (600, 960)  # 8 x 5 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # not blank: curves and text were drawn

    code, _, err = gpupar_cli("report", root / "crashed")
    assert code == 2 and "no metrics.jsonl" in err
    code, _, err = gpupar_cli("runs", "--run-root", tmp_path / "missing")
    assert code == 2 and "no such directory" in err


def test_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "examples" / "gpu_parallelism.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert time.perf_counter() - start < 120
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for expected in ("Using device: cpu", "Epoch [100/100], Loss:", "DDP through notebook_launch: final loss",
                     "PASS: ddp(dp=2) matches the single-device reference", "Wrote the loss curve to runs/single/loss.png"):
        assert expected in text, text[-4000:]
    assert (tmp_path / "runs/single/tensorboard").is_dir()
