"""The global gradient norm for --clip-grad-norm and gp.clip_grad_norm_: the norm of the whole
model's gradient, as on one device, whatever holds its pieces (FSDP and TP shards as DTensors,
the layers TP keeps whole as plain tensors, pipeline stages on other ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def clip_grad_norm_across(params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None,
                          comm_device: torch.device, uncounted: set[int] = frozenset()) -> torch.Tensor:
    """The L2 norm of the gradients of ``params`` summed over the ranks of ``pp_group``, and the
    gradients scaled by ``max_norm / norm`` where that is below 1; returns the norm (a tensor: no
    host sync). DTensor gradients (FSDP, TP) reduce their own shards first: ``full_tensor()`` of
    their norm counts a replicated shard once and a sharded one in full; plain tensors (whole
    replicas, or the layers tensor parallel leaves whole) count once. ``pp_group`` None: no
    pipeline, nothing to add up. ``uncounted``: ids of parameters clipped but left out of the
    norm (the other stages' copies of a tied parameter, whose one copy counts it once)."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    plain = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    squares = torch.zeros((), dtype=torch.float32, device=comm_device)
    if sharded_counted := [p.grad for p in sharded if id(p) not in uncounted]:
        norm = torch.nn.utils.get_total_norm(sharded_counted, 2.0)
        squares = squares + norm.full_tensor().to(comm_device, torch.float32) ** 2
    if plain_counted := [p.grad for p in plain if id(p) not in uncounted]:
        squares = squares + torch.nn.utils.get_total_norm(plain_counted, 2.0).to(comm_device, torch.float32) ** 2
    if pp_group is not None:  # stages hold disjoint parameters: their squares add up
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    for kind in (sharded, plain):  # one foreach each: torch's cannot mix DTensors and tensors (TP's whole layers)
        if kind:
            torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total.to(kind[0].grad.device))
    return total

