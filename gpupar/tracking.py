"""Experiment tracking on rank 0: TensorBoard event files or an MLflow run (``--track``).

The run directory's ``metrics.jsonl`` is always written; a tracker sends the same records
(loss, learning rate, throughput, validation loss) plus memory to the tool MLOps readers
already watch. Only rank 0 tracks: every rank holds the same averaged loss, so other
ranks would only duplicate it. The tracker is picked by a plain ``if``, not a registry.

* TensorBoard: ``RUN/tensorboard/events.out.tfevents.*`` via
  ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package);
  view with ``tensorboard --logdir runs``.
* MLflow: one run per training run, named after the run directory, with the whole
  effective config as params (``optim.lr``, ...), the records as metrics at their step,
  and config.toml, model.safetensors and any bench report as artifacts. The store is
  ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  working directory (artifacts under ``./mlruns``), which works offline; view it with
  ``mlflow ui``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from gpupar.config import Config, as_dict
from gpupar.errors import UsageError
from gpupar.topology import Topology

# The import each tracker needs, and the extra that brings it.
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
ARTIFACTS = ("config.toml", "model.safetensors")
REPORT_PATTERNS = ("bench*.json", "bench*.md", "bench*.png", "report*.md")  # bench reports, when present


def check_available(track: str) -> None:
    """Fail before any training (or launch) when the tracker's package is missing."""
    if track not in NEEDS:
        return
    module, extra = NEEDS[track]
    needed = [module] + (["sqlalchemy", "alembic"] if track == "mlflow" else [])
    if any(_missing(m) for m in needed):
        raise UsageError(f"--track {track} needs the {extra} extra: pip install 'gpupar[{extra}]'")


def _missing(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is None  # None marks a module that failed (or is blocked) to import
    return importlib.util.find_spec(module) is None


def open_tracker(cfg: Config, run_dir: Path, topo: Topology) -> "Tracker":
    """The tracker for ``--track`` on rank 0; a no-op tracker everywhere else."""
    track = cfg.track.track
    if not topo.is_main or track == "none":
        return Tracker()
    check_available(track)
    if track == "tensorboard":
        return TensorBoardTracker(run_dir, topo.device)
    if track == "mlflow":
        return MLflowTracker(cfg, run_dir, topo.device)
    raise UsageError(f"--track {track!r} is not one of: none, tensorboard, mlflow")


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's peak RSS otherwise."""
    from gpupar.memory import peak_bytes

    return peak_bytes(device)[0] / 2**20


class Tracker:
    """Does nothing: ``--track none`` and every rank but 0."""

    def log(self, record: dict) -> None:
        """One logged record of fit(): step, epoch, loss, lr, samples_per_s[, val_loss]."""

    def finish(self, run_dir: Path, summary: dict) -> None:
        """After the run directory is written: final figures and files, then close the run."""
        self.close()

    def close(self, failed: bool = False) -> None:
        pass

    @contextlib.contextmanager
    def failing_on_error(self):
        """Close the tracked run as failed if training raises (a NaN loss, a failed rank)."""
        try:
            yield
        except BaseException:
            self.close(failed=True)
            raise


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, device: torch.device):
        from torch.utils.tensorboard import SummaryWriter

        from gpupar.run.files import check_inside

        self.device = device
        self.log_dir = run_dir / "tensorboard"
        if self.log_dir.is_symlink() or self.log_dir.exists():  # its event files are written inside the run only
            check_inside(self.log_dir, run_dir, "--run-dir's tensorboard folder")
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, record: dict) -> None:
        step = record["step"]
        self.writer.add_scalar("loss/train", record["loss"], step)
        if "val_loss" in record:
            self.writer.add_scalar("loss/val", record["val_loss"], step)  # same chart as the training loss
        self.writer.add_scalar("lr", record["lr"], step)
        self.writer.add_scalar("throughput/samples_per_s", record["samples_per_s"], step)
        self.writer.add_scalar("memory/peak_mb", memory_mb(self.device), step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, cfg: Config, run_dir: Path, device: torch.device):
        import mlflow

        self.mlflow, self.device = mlflow, device
        mlflow.set_tracking_uri(cfg.track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI)
        mlflow.set_experiment(cfg.track.experiment)
        self.run = mlflow.start_run(run_name=run_dir.name)
        # None fields are left out: MLflow params are strings, and "None" would read as a value.
        mlflow.log_params({f"{section}.{name}": value for section, values in as_dict(cfg).items()
                           for name, value in values.items() if value is not None})
        mlflow.set_tag("gpupar.run_dir", str(run_dir.resolve()))

    def log(self, record: dict) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "step"}
        metrics["memory_peak_mb"] = memory_mb(self.device)
        self.mlflow.log_metrics(metrics, step=record["step"])

    def finish(self, run_dir: Path, summary: dict) -> None:
        self.mlflow.log_metrics({"final_loss": summary["final_loss"], "wall_time_s": summary["wall_time_s"],
                                 "run_samples_per_s": summary["samples_per_s"]})
        files = [run_dir / name for name in ARTIFACTS]
        files += sorted(p for pattern in REPORT_PATTERNS for p in run_dir.glob(pattern))
        for path in files:
            if path.is_file() and not path.is_symlink():  # a link could upload a file from outside the run
                self.mlflow.log_artifact(str(path))
        self.close()

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
