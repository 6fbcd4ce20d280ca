"""Cost of --track on the training loop: the classic example with a record at every epoch.

Trains SimpleNN (1000 samples, 100 full-batch Adam epochs, --log-every 1, so 100 tracked
records) with --track none, tensorboard and mlflow, and prints the median
wall time of fit() (which includes every tracker.log call) and per record. MLflow's
store is a fresh SQLite file in a temporary directory.

    python benchmarks/tracking_overhead.py --repeats 5
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from gpupar.config import Config
from gpupar import launch
from gpupar.job import train_from_config
from gpupar.topology import Topology


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    times: dict[str, list[float]] = {"none": [], "tensorboard": [], "mlflow": []}
    # One block per mode, MLflow last: its client keeps background threads busy for a while
    # after a run, which slowed whichever mode ran next when the modes were interleaved.
    for track in times:
        for repeat in range(args.repeats + 1):  # the first run warms imports and the MLflow database
            cfg = Config()
            cfg.train.log_every, cfg.train.progress = 1, False
            cfg.train.run_dir = str(tmp / f"{track}-{repeat}")
            cfg.track.track, cfg.track.mlflow_uri = track, f"sqlite:///{tmp / 'mlflow.db'}"
            _, history, _ = launch.run(cfg, "train", lambda topo, run: train_from_config(cfg, topo, run, log=lambda _: None))
            if repeat:
                times[track].append(history.wall_time)
    base = statistics.median(times["none"])
    print(f"{'track':<12} {'fit wall time':>14} {'per record':>11}")
    for track, values in times.items():
        median = statistics.median(values)
        print(f"{track:<12} {median * 1e3:>11.1f} ms {(median - base) / 100 * 1e3:>8.2f} ms")


if __name__ == "__main__":
    main()
