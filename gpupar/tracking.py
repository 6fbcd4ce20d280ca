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

A tracking store is a server gpupar does not control: it may refuse, or accept and never
answer. So every call to it runs on one background thread (``Background``): training never
waits on it, and a call that fails or stays unanswered past ``--track-timeout`` seconds stops
tracking with one warning line. At the end the run waits at most that long for the calls
still queued, so a dead server costs a run at most ``--track-timeout`` seconds, once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import queue
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import torch

from gpupar.config import Config, as_dict
from gpupar.errors import UsageError, first_line
from gpupar.topology import Topology

# The import each tracker needs, and the extra that brings it.
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
ARTIFACTS = ("config.toml", "model.safetensors")
REPORT_PATTERNS = ("bench*.json", "bench*.md", "bench*.png", "report*.md")  # bench reports, when present
# The URI schemes MLflow keeps runs in (its tracking-store registry): a path has none ("" or a
# drive letter); a database URI may name its driver (postgresql+psycopg2://). Plugins add
# theirs under the entry-point group below.
MLFLOW_SCHEMES = ("file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                  "uc")
MLFLOW_PLUGINS = "mlflow.tracking_store"


def check_tracking(cfg: Config) -> None:
    """Before any rank starts: the tracker's package is there, and MLflow can use the URI."""
    check_available(cfg.track.track)
    if cfg.track.track == "mlflow":
        check_mlflow_uri(cfg)


def mlflow_uri(cfg: Config) -> str:
    return cfg.track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI


def check_mlflow_uri(cfg: Config) -> None:
    """An unsupported scheme (``bogus://x``) was MLflow's traceback on rank 0 after launch."""
    uri = mlflow_uri(cfg)
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+")[0]
    if len(scheme) == 1 and scheme.isalpha():  # C:\runs: a Windows path
        scheme = ""
    plugins = sorted(ep.name for ep in importlib.metadata.entry_points(group=MLFLOW_PLUGINS))
    if scheme and scheme not in MLFLOW_SCHEMES and scheme not in plugins:
        where = "--mlflow-uri" if cfg.track.mlflow_uri else "$MLFLOW_TRACKING_URI"
        raise UsageError(f"{where} {uri!r}: MLflow keeps no runs at a {scheme}:// URI; accepted: a path, "
                         f"{', '.join(s + '://' for s in MLFLOW_SCHEMES[:-3] + tuple(plugins))} or databricks")


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
        return MLflowTracker(cfg, run_dir, topo.device, Background(f"--track mlflow {mlflow_uri(cfg)}",
                                                                   cfg.track.track_timeout))
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


class Background:
    """A tracker's calls to its store, run in order on one daemon thread, so that training
    never waits on the network (a daemon: a call stuck in a socket does not hold the process
    at exit). The first call that fails, or that stays unanswered past ``timeout`` seconds,
    stops tracking with one warning line; the calls after it are dropped (``metrics.jsonl``
    has every record)."""

    def __init__(self, what: str, timeout: float, warn=None):
        self.what, self.timeout = what, timeout
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stopped = False
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self._busy_since: float | None = None  # when the call in flight started
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="gpupar-tracking", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> None:
        """Queue ``fn(*args)``; costs the caller no wait (a stuck call is noticed here)."""
        self._check_stuck()
        if not self.stopped:
            self.calls.put((fn, args))

    def drain(self) -> None:
        """Wait for the queued calls while they progress: at most ``timeout`` on any one."""
        self.calls.put(None)
        while self._thread.is_alive() and not self.stopped:
            self._thread.join(min(0.05, self.timeout))
            self._check_stuck()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        self.warn(f"gpupar: warning: {self.what}: {reason}; tracking stopped, training goes on "
                  "(metrics.jsonl has every record)")

    def _check_stuck(self) -> None:
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.timeout:
            self.stop(f"no answer within --track-timeout {self.timeout:g} s")

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.stopped:
                continue
            fn, args = call
            self._busy_since = time.monotonic()
            try:
                fn(*args)
            except Exception as exc:  # a refused connection, an HTTP error, a store that cannot open
                self.stop(f"{type(exc).__name__}: {first_line(exc, '')[:300]}")
            finally:
                self._busy_since = None


class MLflowTracker(Tracker):
    """One MLflow run, written through ``MlflowClient`` (no process-wide active run) on the
    ``Background`` thread: every call, opening the store included, is off the training path."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, calls: Background):
        self.device, self.calls, self.run_id = device, calls, None
        self.client = None
        # None fields are left out: MLflow params are strings, and "None" would read as a value.
        params = {f"{section}.{name}": value for section, values in as_dict(cfg).items()
                  for name, value in values.items() if value is not None}
        calls.submit(self._start, mlflow_uri(cfg), cfg.track.experiment, run_dir, params)

    def _start(self, uri: str, experiment: str, run_dir: Path, params: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"gpupar.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def _metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log(self, record: dict) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "step"}
        metrics["memory_peak_mb"] = memory_mb(self.device)
        self.calls.submit(self._metrics, metrics, record["step"])

    def finish(self, run_dir: Path, summary: dict) -> None:
        self.calls.submit(self._metrics, {"final_loss": summary["final_loss"], "wall_time_s": summary["wall_time_s"],
                                          "run_samples_per_s": summary["samples_per_s"]}, 0)
        files = [run_dir / name for name in ARTIFACTS]
        files += sorted(p for pattern in REPORT_PATTERNS for p in run_dir.glob(pattern))
        for path in files:
            if path.is_file() and not path.is_symlink():  # a link could upload a file from outside the run
                self.calls.submit(lambda p: self.client.log_artifact(self.run_id, p), str(path))
        self.close()

    def close(self, failed: bool = False) -> None:
        self.calls.submit(lambda status: self.client.set_terminated(self.run_id, status),
                          "FAILED" if failed else "FINISHED")
        self.calls.drain()
