"""What `gpupar verify -- python script.py` records through ``gpupar.setup``: every step's
loss, the first step's gradients and the final state, in the run directory verify names
(``GPUPAR_VERIFY_DIR``); and the one-ulp nudge of its rounding-noise reference."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

from gpupar.run.files import atomic_write_text
from gpupar.topology import Topology

DIR_ENV, NUDGE_ENV, NO_DROPOUT_ENV = "GPUPAR_VERIFY_DIR", "GPUPAR_VERIFY_NUDGE", "GPUPAR_VERIFY_NO_DROPOUT"
_OPEN: list = []  # recorders not yet written: at exit, or when `gpupar run` finishes the script


def flush() -> None:
    while _OPEN:
        _OPEN.pop().write()


def from_env(topo: Topology) -> "Recorder | None":
    if DIR_ENV not in os.environ:
        return None
    return Recorder(Path(os.environ[DIR_ENV]), topo, os.environ.get(NUDGE_ENV) == "1",
                    os.environ.get(NO_DROPOUT_ENV) == "1")


class Recorder:
    def __init__(self, root: Path, topo: Topology, nudge: bool, no_dropout: bool = False):
        self.root, self.topo, self.nudge, self.no_dropout = root, topo, nudge, no_dropout
        self.losses, self.final, self.model = [], None, None
        if topo.is_main:
            root.mkdir(parents=True, exist_ok=True)
        _OPEN.append(self)
        atexit.register(flush)

    def prepare(self, model) -> None:
        """Before parallelize: the noise reference's nudge, --no-dropout, and the names of the
        layers that may keep a model from matching one device (verify's notes)."""
        from gpupar.parity.noise import batch_norms, disable_dropout, nudge_weights, random_layers

        if self.no_dropout:
            disable_dropout(model)
        if self.nudge:
            nudge_weights(model)
        if self.topo.is_main:
            names = {"batch_norms": batch_norms(model), "random_layers": random_layers(model)}
            atomic_write_text(self.root / "notes.json", json.dumps(names))

    def watch(self, model, optimizer) -> None:
        """Gather the step-1 gradients before the first step, the whole state after each
        (a collective while every rank is still in the loop; written at exit)."""
        from gpupar.parallelize import full_state_dict
        from gpupar.parity.noise import full_grads
        from gpupar.weights import save_weights

        self.model = model
        first = {"done": False}

        def before(*_):
            if not first["done"]:
                first["done"] = True
                grads = full_grads(model, self.topo)
                if grads is not None:
                    save_weights(grads, self.root / "first_grads.safetensors")

        def after(*_):
            self.final = full_state_dict(model, self.topo)

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)

    def loss(self, loss) -> None:
        self.losses.append(loss.detach().clone())

    def write(self) -> None:
        if not self.topo.is_main:
            return
        from gpupar.run.files import atomic_write_text
        from gpupar.weights import save_weights

        atomic_write_text(self.root / "step_losses.json", json.dumps([float(v) for v in self.losses]))
        if self.final is not None:
            save_weights(self.final, self.root / "model.safetensors")
