"""Validation through a pipeline: a forward-only pass of every stage, with no schedule.

A schedule's stages hold receive buffers for the training micro-batch's shape (and a traced
stage may be specialised to it), while a validation set has any number of rows. So
evaluation walks the stages in order, each owner running its stage on the whole chunk and
sending what it produced to the next stage's rank, shapes first (stage ``s`` lives on pp rank
``stage_owner(s)``; in a V the turn's two stages share a rank and pass their outputs there). The last stage computes the loss, which is broadcast to the whole
pipeline, so every rank reports the same validation loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from gpupar.training.step import pipeline_loss

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool]


def _send(tensors: tuple[torch.Tensor, ...], dst: int, comm_device: torch.device) -> None:
    header = [len(tensors)]
    for t in tensors:
        header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    dist.send(torch.tensor([len(header)], dtype=torch.int64, device=comm_device), dst)
    dist.send(torch.tensor(header, dtype=torch.int64, device=comm_device), dst)
    for t in tensors:
        dist.send(t.detach().to(comm_device).contiguous(), dst)


def _recv(src: int, comm_device: torch.device, device: torch.device) -> tuple[torch.Tensor, ...]:
    size = torch.zeros(1, dtype=torch.int64, device=comm_device)
    dist.recv(size, src)
    header = torch.zeros(int(size), dtype=torch.int64, device=comm_device)
    dist.recv(header, src)
    values, at, out = header.tolist(), 1, []
    for _ in range(values[0]):
        dtype, ndim = _DTYPES[values[at]], values[at + 1]
        shape = values[at + 2:at + 2 + ndim]
        at += 2 + ndim
        t = torch.empty(shape, dtype=dtype, device=comm_device)
        dist.recv(t, src)
        out.append(t.to(device))
    return tuple(out)


@torch.no_grad()
def evaluate_pipeline(pipe: nn.Module, samples, loss_fn: nn.Module, precision: str = "fp32",
                      batch_size: int | None = None) -> float:
    """Mean loss over ``samples`` (every rank evaluates all of them; every rank returns it)."""
    group, device, comm = pipe.pp_group, pipe.device, pipe.comm_device
    me = dist.get_rank(group)
    modules = dict(zip(pipe.stage_ids, pipe.stages))
    owner = pipe.stage_owner  # stage -> pp rank
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
    total = torch.zeros((), dtype=torch.float64, device=device)
    rows = 0
    pipe.eval()
    size = batch_size or len(samples)
    try:
        for start in range(0, len(samples), size):
            x, y = samples.take_to(slice(start, start + size), device)
            carried = None  # the previous stage's outputs when it lives on this rank too (a V's turn)
            for s in range(pipe.num_stages):
                if owner(s) != me:
                    continue
                if s == 0:
                    inputs = (x,)
                elif owner(s - 1) == me:
                    inputs = carried
                else:
                    inputs = _recv(dist.get_global_rank(group, owner(s - 1)), comm, device)
                with amp:
                    out = modules[s](*inputs)
                outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                if s < pipe.num_stages - 1 and owner(s + 1) == me:
                    carried = outs
                elif s < pipe.num_stages - 1:
                    _send(outs, dist.get_global_rank(group, owner(s + 1)), comm)
                else:
                    with amp:
                        loss = pipeline_loss(loss_fn, outs[0] if len(outs) == 1 else out, x, y)
                    total += loss.detach().to(torch.float64) * len(x)
            rows += len(x)
    finally:
        pipe.train()
    total = total.to(comm)
    dist.broadcast(total, src=pipe.last_rank, group=group)  # the last stage's loss, to every stage
    return float(total) / max(rows, 1)
