"""``--cuda-graphs`` on one GPU: the whole training step captured as one CUDA graph.

A small model's step is a few dozen kernels of a few microseconds each; launching them from
Python costs more than running them, so the GPU waits on the host. A CUDA graph records the
kernels once and replays them with one launch (NVIDIA, "CUDA Graphs", CUDA C++ Programming
Guide). Compiling the model with ``mode="reduce-overhead"`` graphs the forward and the
backward, but the loss, the NaN/Inf check and the optimizer still launch one by one, and
every new model records its graphs again: on an H200 the classic example ran 1.27x *slower*
that way than the plain loop. So on one device ``--cuda-graphs`` captures everything a step
does, as PyTorch's "whole-network capture" recipe does: forward, loss, backward, the
NaN/Inf flag, gradient clipping and the fused, capturable optimizer step (masked on the
device by the flag). The learning rate is a device tensor the scheduler fills, so a
schedule keeps working inside the graph.

What capture needs, and how the loop provides it:
- a few eager steps first, on a side stream (cuBLAS and autograd set up their state, the
  optimizer creates its moments): the first ``WARMUP`` steps are real steps, run eagerly;
- fixed shapes and addresses: the batches of the capture step become the graph's inputs,
  and every later batch is copied into them (the full batch is the same tensor every step,
  so nothing is copied);
- no host sync inside the step: the loop has none between log points (finite.py);
- autocast without its cast cache (``cache_enabled=False``), which would hold casts made
  during capture.

Where the step is not one process (DDP, FSDP, tensor and pipeline parallel) ``--cuda-graphs``
keeps compile's ``reduce-overhead`` mode (loop.compiled_step).
"""

from __future__ import annotations

from typing import Callable

import torch

from gpupar.config import Config
from gpupar.errors import UsageError

WARMUP = 3  # eager steps before the capture (PyTorch's recipe warms up on a side stream)

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[Batches, bool], tuple[torch.Tensor, torch.Tensor]]


def need_cuda(device_type: str) -> None:
    if device_type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (this run is on {device_type}); use --compile alone")


def check_config(cfg: Config, device_type: str) -> None:
    """What a captured step cannot do, as one line each: before launch (job.preflight)."""
    need_cuda(device_type)
    if cfg.train.precision == "fp16":
        raise UsageError("--cuda-graphs with --precision fp16: the loss scaler reads its scale on the host every "
                         "step; use --precision bf16, which needs no scaler")
    if cfg.optim.optimizer == "sgd" or cfg.optim.optimizer_impl != "fused":
        raise UsageError("--cuda-graphs captures the optimizer step too: it needs --optimizer adam or adamw with "
                         f"--optimizer-impl fused (this run: --optimizer {cfg.optim.optimizer} "
                         f"--optimizer-impl {cfg.optim.optimizer_impl})")


def check(cfg: Config, optimizer: torch.optim.Optimizer) -> None:
    """The same, for the optimizer ``fit`` got (the Python API may pass its own)."""
    check_config(cfg, "cuda")  # fp16, the only precision with a loss scaler, is refused here
    group = optimizer.param_groups[0]
    if not (group.get("fused") and group.get("capturable")):
        raise UsageError("--cuda-graphs captures the optimizer step too: pass no optimizer (gpupar builds a fused, "
                         "capturable one) or one built with fused=True, capturable=True and a tensor lr")


class WholeStep:
    """``step(micro_batches, first) -> (loss, bad)`` eagerly for ``WARMUP`` steps, then captured
    once and replayed. Returns copies of the graph's loss and flag (the next replay overwrites
    the graph's own)."""

    def __init__(self, step: Step):
        self.step = step
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Batches = []  # the capture step's batches: the graph reads them
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, micro_batches: Batches, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls <= WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(micro_batches, first)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = list(micro_batches)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records; nothing runs until the replay below
                self.out = self.step(self.inputs, False)
        for (static_x, static_y), (x, y) in zip(self.inputs, micro_batches):
            if x is not static_x:
                static_x.copy_(x)
            if y is not static_y:
                static_y.copy_(y)
        self.graph.replay()
        loss, bad = self.out
        return loss.clone(), bad.clone()
