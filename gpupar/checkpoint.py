"""Periodic distributed checkpoints: atomic commit, exact resume, keep-last, export.

A checkpoint is a directory ``RUN/checkpoints/step-N/`` written with
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the model and
optimizer state in parallel, and DCP records which global slice each shard holds. The state
comes from ``get_state_dict`` (parameter names without DDP/FSDP wrappers, DTensor shards for
FSDP2 and tensor parallelism), so a checkpoint saved by one strategy and world size loads
into another: DCP reads each rank's new slice from whatever shards cover it.

Beside the DCP files sit two small JSON files, readable without unpickling anything:
``trainer.json`` (the step, the position in the data, the LR scheduler, the run's shape) from
rank 0, and ``rng/rank-R.json`` (torch, CUDA, Python and NumPy RNG states) from every rank.

The commit is atomic: all ranks write into ``step-N.tmp/``, meet at a barrier, then rank 0
renames it to ``step-N/`` and writes a ``COMPLETE`` marker. A directory without the marker
(a crash mid-save) is never resumed from, and older checkpoints are pruned only after the
new one is complete.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gpupar.training.state import Position
from gpupar.safe_dcp import SafeLoadPlanner, SafeReader, check_seal, read_dcp_metadata, seal
from gpupar.weights import check_weights_out, save_weights
from gpupar.config import Config
from gpupar.errors import TrainingError, UsageError, first_line
from gpupar.memory import local_shard
from gpupar.run.files import check_inside, write_nofollow
from gpupar.run.saving import save_failed, signals_held
# A pipeline's state under the whole model's names (plain get_state_dict / set_state_dict otherwise).
from gpupar.parallel.pipeline_state import load_state_dicts, model_state, state_dicts
from gpupar.run.rundir import COMPLETE, check_not_run_file, complete_checkpoints, resolve_resume, run_id_of
from gpupar.topology import Topology

FORMAT = 1


# --- saving -----------------------------------------------------------------------------------

class Checkpointer:
    """Saves every ``--checkpoint-every`` steps and restores at start; the loop calls it."""

    def __init__(self, cfg: Config, topo: Topology, run_dir: Path, log: Callable[[str], None] = print,
                 run_id: str = ""):
        self.cfg, self.topo, self.log, self.run_id = cfg, topo, log, run_id
        self.root = Path(run_dir) / "checkpoints"
        if self.root.exists() or self.root.is_symlink():  # checkpoints are written only inside the run
            check_inside(self.root, run_dir, "--run-dir's checkpoints folder")
        self.every = cfg.checkpoint.checkpoint_every
        spec = cfg.checkpoint.resume
        if spec is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            spec = "auto"  # TorchElastic restarted the workers: continue where the last commit left off
        self.resume_from = resolve_resume(spec, Path(run_dir)) if spec else None
        self.resume_requested = spec is not None
        self.steps_per_epoch = 0  # set by restore(), which the loop calls before training

    def on_step_end(self, position: Position, model: nn.Module, optimizer, scheduler, total_steps: int) -> None:
        if self.every and position.step % self.every == 0:
            self.save(position, model, optimizer, scheduler, total_steps)

    def save(self, position: Position, model: nn.Module, optimizer, scheduler, total_steps: int) -> Path:
        with signals_held():  # Ctrl-C or SIGTERM mid-save: the save ends first, then the run stops
            return self._save(position, model, optimizer, scheduler, total_steps)

    def _save(self, position: Position, model: nn.Module, optimizer, scheduler, total_steps: int) -> Path:
        topo = self.topo
        final = self.root / f"step-{position.step}"
        tmp = self.root / f"step-{position.step}.tmp"
        if not _all_finite_params(model, topo):  # never write a checkpoint one cannot train on from
            raise TrainingError(f"parameters are non-finite at step {position.step}; no checkpoint was written")
        if topo.is_main:
            if tmp.is_symlink():  # never write through a link planted in the run directory
                tmp.unlink()
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
            (tmp / "rng").mkdir(parents=True)
        _barrier(topo)

        model_state, optim_state = state_dicts(model, optimizer)
        try:
            with _quiet():
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp,
                         no_dist=not dist.is_initialized())
            _write_json(tmp / "rng" / f"rank-{topo.rank}.json", rng_state())
            if topo.is_main:
                _write_json(tmp / "trainer.json", {
                    "format": FORMAT, "position": asdict(position), "total_steps": total_steps,
                    "steps_per_epoch": self.steps_per_epoch, "scheduler": _scheduler_state(scheduler),
                    "model": self.cfg.model.name, "strategy": self.topo.dims.describe(),
                    "world_size": topo.world_size, "torch": torch.__version__, "run_id": self.run_id})
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            kept = any(run_id_of(p) == self.run_id for p in complete_checkpoints(self.root))
            failure = save_failed(exc, position.step, self.root, kept)  # before the cleanup frees the disk
            if topo.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the half-written save; the earlier ones stay
            raise failure from None
        _barrier(topo)  # every rank's shards are on disk

        if topo.is_main:
            commit(tmp, final)
            # keep-last counts this run's checkpoints only: another run's are not this run's to delete.
            ours = [p for p in complete_checkpoints(self.root) if run_id_of(p) == self.run_id]
            for old in ours[:-self.cfg.checkpoint.keep_last]:
                _remove(old)
        return final

    # --- resuming ---------------------------------------------------------------------------

    def restore(self, model: nn.Module, optimizer, scheduler, steps_per_epoch: int, total_steps: int) -> Position:
        """Load model, optimizer, scheduler and RNG states from the chosen checkpoint; return
        the position to continue from (step 0 when there is nothing to resume)."""
        self.steps_per_epoch = steps_per_epoch
        path = self.resume_from
        if path is None:
            if self.resume_requested and self.topo.is_main:
                self.log(f"No complete checkpoint in {self.root}; starting from step 0")
            return Position()
        where = f"--resume {path}"
        check_seal(path, where)  # flipped bytes in a shard would otherwise load silently
        trainer = check_trainer(_read_json(path / "trainer.json", where), path / "trainer.json")
        try:
            metadata = read_dcp_metadata(path)
        except Exception as exc:
            raise UsageError(f"{where}: corrupt or unsafe checkpoint metadata ({_first_line(exc)})") from None
        check_compatible(model, metadata, where)
        if trainer.get("steps_per_epoch") != steps_per_epoch:
            raise UsageError(f"{where}: saved with {trainer.get('steps_per_epoch')} steps per epoch, this run has "
                             f"{steps_per_epoch}; the data and --batch-size must match to continue at the same batch")

        model_state, optim_state = state_dicts(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        try:
            with _quiet():
                dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(),
                         no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as exc:
            raise UsageError(f"{where}: cannot load it into this model and optimizer ({_first_line(exc)})") from None
        load_state_dicts(model, optimizer, state["model"], state["optim"])
        if scheduler is not None and trainer.get("scheduler"):
            scheduler.load_state_dict(trainer["scheduler"])
        rng_file = path / "rng" / f"rank-{self.topo.rank}.json"
        rng_file = rng_file if rng_file.is_file() else path / "rng" / "rank-0.json"
        restore_rng(_read_json(rng_file, where), rng_file)

        position = Position(**trainer["position"])
        if self.topo.is_main:
            note = ""
            if trainer.get("total_steps") != total_steps and scheduler is not None:
                note = (f" (the LR schedule was planned for {trainer.get('total_steps')} steps and now follows "
                        f"{total_steps} from here)")
            self.log(f"Resumed from {path} at step {position.step} (saved by {trainer.get('strategy')} on "
                     f"{trainer.get('world_size')} rank(s)){note}")
        return position


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written checkpoint visible in one rename: it is sealed first (the
    ``COMPLETE`` marker lists a SHA-256 per file; resume and export hold the files to it), so
    ``step-N/`` exists only whole, whenever a signal or a crash comes."""
    seal(tmp)
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        _remove(final)  # an older save of the same step (a run resumed from before it)
    os.replace(tmp, final)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint: renamed out of the ``step-N`` names first, so that an interrupted
    delete leaves no half-deleted checkpoint that looks complete."""
    doomed = checkpoint.with_name(f"{checkpoint.name}.deleting.tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def check_compatible(model: nn.Module, metadata, where: str) -> None:
    """Name the first parameter missing from the checkpoint or saved with another shape."""
    saved = {k[len("model."):]: v.size for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    for name, value in model_state(model).items():  # global shapes, also for sharded tensors
        if name not in saved:
            raise UsageError(f"{where}: the checkpoint has no parameter {name!r} (it holds {sorted(saved)[:4]}); "
                             "was it saved from another model?")
        if tuple(saved[name]) != tuple(value.shape):
            raise UsageError(f"{where}: parameter {name!r} has shape {list(saved[name])} in the checkpoint, "
                             f"the model expects {list(value.shape)}")


# --- export -------------------------------------------------------------------------------------

def export_run(checkpoint: str | Path, out: str | Path) -> Path:
    """`gpupar export`: the checkpoint's full weights, with the run's config.toml copied beside
    them (predict rebuilds the model from it) unless one is there already."""
    import shutil

    from gpupar.run.files import atomic_write

    written = export_weights(Path(checkpoint), Path(out))
    run_config = Path(checkpoint).resolve().parent.parent / "config.toml"
    if run_config.is_file() and not (written.parent / "config.toml").exists():
        atomic_write(written.parent / "config.toml", lambda tmp: shutil.copyfile(run_config, tmp))
    return written


def export_weights(checkpoint: Path, out: Path) -> Path:
    """Gather the full model weights of a checkpoint (any strategy, any world size) into one
    safetensors file, in this one process."""
    where = f"--checkpoint {checkpoint}"
    check_weights_out(out, "--out")  # before the gather: a bad --out must not waste it
    check_not_run_file(out, "--out")
    if checkpoint.is_dir() and out.exists() and checkpoint.resolve() in out.resolve().parents:
        raise UsageError(f"--out {out} is inside the checkpoint {checkpoint}; write the weights outside it")
    if not checkpoint.is_dir():
        raise UsageError(f"{where}: no such checkpoint directory; expected RUN/checkpoints/step-N")
    if not (checkpoint / ".metadata").is_file():
        raise UsageError(f"{where}: not a gpupar checkpoint directory (no .metadata); expected RUN/checkpoints/step-N")
    if not (checkpoint / COMPLETE).is_file():
        raise UsageError(f"{where}: incomplete checkpoint (no {COMPLETE} marker: its save was interrupted)")
    check_seal(checkpoint, where)
    try:
        metadata = read_dcp_metadata(checkpoint)
    except Exception as exc:
        raise UsageError(f"{where}: corrupt or unsafe checkpoint metadata ({_first_line(exc)})") from None
    # Empty full-size tensors for every model entry; DCP fills each from the shards covering it.
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    if not state:
        raise UsageError(f"{where}: holds no model weights")
    try:
        with _quiet():
            dcp.load(state, storage_reader=SafeReader(checkpoint), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise UsageError(f"{where}: cannot read the weights ({_first_line(exc)})") from None
    return save_weights({k[len("model."):]: v for k, v in state.items()}, out)


# --- helpers ------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG this process may draw from, as JSON (bytes as base64)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(mt), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def check_trainer(trainer, file: Path) -> dict:
    """``trainer.json`` as resume needs it, or one line naming the file and what was expected."""
    expected = ('expected {"position": {"step": N, "epoch": E, "batch": B}, ...} with counts >= 0, '
                "as gpupar writes it")
    position = trainer.get("position") if isinstance(trainer, dict) else None
    if not isinstance(position, dict) or set(position) != {"step", "epoch", "batch"}:
        got = type(trainer).__name__ if not isinstance(trainer, dict) else f"position {position!r}"
        raise UsageError(f"corrupt checkpoint file {file}: got {_short(got)}; {expected}")
    for key, value in position.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UsageError(f"corrupt checkpoint file {file}: position.{key} is {_short(repr(value))}; {expected}")
    named = file.parent.name.removeprefix("step-")
    if named.isdigit() and int(named) != position["step"]:  # gpupar names a checkpoint by its step
        raise UsageError(f"corrupt checkpoint file {file}: position.step is {_short(repr(position['step']))} in "
                         f"a checkpoint named {file.parent.name}; {expected}")
    if not isinstance(trainer.get("scheduler"), (dict, type(None))):
        raise UsageError(f"corrupt checkpoint file {file}: scheduler is {_short(repr(trainer['scheduler']))}; "
                         "expected the LR scheduler's state (an object) or null")
    return trainer


def restore_rng(state, file: Path) -> None:
    """Set every RNG from ``rng/rank-R.json``, or name the file and what it should hold."""
    expected = 'expected {"torch": ..., "python": [...], "numpy": [...]} as gpupar writes it'
    if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"corrupt checkpoint file {file}: got {_short(repr(got))}; {expected}")
    try:
        set_rng_state(state)
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as exc:  # binascii.Error is a ValueError
        raise UsageError(f"corrupt checkpoint file {file}: the RNG states do not load ({_first_line(exc)}); "
                         f"{expected}") from None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), i)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _scheduler_state(scheduler) -> dict | None:
    if scheduler is None:
        return None
    # LambdaLR's state is plain numbers (its learning rates are tensors under --cuda-graphs: read
    # here, at a checkpoint); its lambda is code, saved as None and rebuilt from the config.
    return {k: [float(x) if isinstance(x, torch.Tensor) else x for x in v] if isinstance(v, list) else v
            for k, v in scheduler.state_dict().items()}


def _all_finite_params(model: nn.Module, topo: Topology) -> bool:
    local = all(bool(torch.isfinite(local_shard(p)).all()) for p in model.parameters())
    if not topo.distributed:
        return local
    flag = torch.tensor([0.0 if local else 1.0], device=topo.comm_device())
    dist.all_reduce(flag)
    return flag.item() == 0.0


@contextlib.contextmanager
def _quiet():
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(topo: Topology) -> None:
    if topo.distributed and dist.is_initialized():
        dist.barrier()


def _write_json(path: Path, obj) -> None:
    write_nofollow(path, json.dumps(obj).encode())  # a link planted in step-N.tmp is never written through


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{where}: corrupt checkpoint ({path.name} is missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: corrupt checkpoint ({path.name}: {exc})") from None
    except RecursionError:
        raise UsageError(f"{where}: corrupt checkpoint ({path.name}: nested too deeply to be gpupar's)") from None


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException) and exc.failures:  # DCP wraps each rank's error
        rank, (inner, _) = next(iter(exc.failures.items()))
        return f"rank {rank}: {type(inner).__name__}: {first_line(inner)}"
    return first_line(exc)
