"""`gpupar export`: a run's final weights (``--run``) or a checkpoint's (``--checkpoint``) as
one file the rest of the world reads: a safetensors file, or, for a Hugging Face (``hf:``)
model, a ``save_pretrained`` directory that ``AutoModelForCausalLM.from_pretrained`` loads.

The model is rebuilt from the run's own config.toml only for ``hf:`` models (transformers
builds them from a config, with no user code); the weights are read as safetensors or
through the checked DCP reader, never unpickled.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from gpupar.checkpoint import export_run, export_weights
from gpupar.config_file import load_toml
from gpupar.errors import UsageError
from gpupar.models.hf import is_hf
from gpupar.run.files import atomic_write, check_not_input
from gpupar.run.rundir import check_not_in_another_run, check_not_run_file
from gpupar.weights import load_into, load_weights, save_weights


def export(run: str | None, checkpoint: str | None, out: str) -> Path:
    """Write the weights of ``run`` (its model.safetensors) or of ``checkpoint``; returns what was written."""
    if (run is None) == (checkpoint is None):
        raise UsageError("gpupar export needs one of --run RUN (its final weights) or --checkpoint RUN/checkpoints/step-N")
    run_dir = Path(run) if run else Path(checkpoint).resolve().parent.parent
    _check_out(Path(out), run_dir, Path(checkpoint) if checkpoint else None)
    config = run_dir / "config.toml"
    model_name = load_toml(config).model.name if config.is_file() else ""
    if not is_hf(model_name):
        if checkpoint:
            return export_run(checkpoint, out)
        return _copy_run_weights(run_dir, Path(out))
    out_dir = _empty_dir(Path(out))
    if checkpoint:
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            state = load_weights(export_weights(Path(checkpoint), Path(tmp) / "model.safetensors"))
    else:
        state = load_weights(_run_weights(run_dir))
    return _save_pretrained(load_toml(config), state, out_dir)


def _check_out(out: Path, run_dir: Path, checkpoint: Path | None) -> None:
    """--out is none of the inputs (by inode), no file of a run, and not inside another run
    (or inside the checkpoint read), checked before anything is read or written."""
    inputs = {"--run's weights": run_dir / "model.safetensors", "the run's config": run_dir / "config.toml"}
    check_not_input(out, "--out", inputs)
    check_not_run_file(out, "--out")
    check_not_in_another_run(out, "--out", run_dir)
    if checkpoint is not None and checkpoint.is_dir() and checkpoint.resolve() in out.absolute().resolve().parents:
        raise UsageError(f"--out {out} is inside the checkpoint {checkpoint}; write the weights outside it")


def _run_weights(run_dir: Path) -> Path:
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"--run {run_dir}: no model.safetensors (a finished gpupar train run holds one; "
                         "for a run that stopped early, export a checkpoint with --checkpoint)")
    return weights


def _copy_run_weights(run_dir: Path, out: Path) -> Path:
    state = load_weights(_run_weights(run_dir))  # read and checked, not copied blind
    written = save_weights(state, out)
    config = run_dir / "config.toml"
    if config.is_file() and not (written.parent / "config.toml").exists():
        atomic_write(written.parent / "config.toml", lambda tmp: shutil.copyfile(config, tmp))
    return written


def _empty_dir(out: Path) -> Path:
    """An ``hf:`` export's directory: new, or empty (nothing of anyone's is replaced)."""
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UsageError(f"--out {out}: must be a new or empty directory (a Hugging Face model directory is "
                         "written there)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: its parent directory does not exist")
    return out


def _save_pretrained(cfg, state: dict, out: Path) -> Path:
    """Rebuild the run's ``hf:`` model, load the exported weights and write it as transformers does,
    into a temporary directory renamed into place (a crash leaves no half-written model)."""
    from gpupar.models.hf import hf_spec

    model = hf_spec(cfg.model).build(0, 0)
    load_into(model, _untie(model, state), "the exported weights")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()  # checked empty above
        Path(tmp).rename(out)
        Path(tmp).mkdir()  # for TemporaryDirectory's own cleanup
    return out


def _untie(model, state: dict) -> dict:
    """The state dict with every key the model has: a tied weight (GPT-2's lm_head and wte) may
    have been saved under one name only."""
    own = model.state_dict()
    by_storage = {}
    for name, tensor in own.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    full = dict(state)
    for names in by_storage.values():
        present = next((n for n in names if n in state), None)
        for n in names:
            if present is not None and n not in full:
                full[n] = state[present]
    return full
