"""Synchronised BatchNorm: normalise with the statistics of the global batch, not of a rank's slice.

Under data parallelism each rank sees 1/W of the batch; plain BatchNorm would normalise each
slice with its own mean and variance, so the model trains differently from one device (and
its running statistics differ per rank). SyncBatchNorm (Ioffe & Szegedy, 2015, computed over
all ranks as in Peng et al., 2018, "MegDet") all-reduces the per-channel sums first.

On CUDA this is PyTorch's ``nn.SyncBatchNorm``. PyTorch's version refuses CPU tensors, so on
gloo ``GlobalBatchNorm`` does the same with two differentiable all-reduces (the sum and count,
then the centred sum of squares: two passes, as one device computes the variance).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole data-parallel batch, for CPU (gloo) ranks."""

    def __init__(self, *args, group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, channels, *]
        if not self.training:  # running statistics, as one device
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        total = dist_nn.all_reduce(torch.cat([x.sum(dims), count]), group=self.group or dist.group.WORLD)
        n = total[-1]
        mean = total[:-1] / n  # [channels]
        centred = x - mean.view(shape)
        var = dist_nn.all_reduce((centred * centred).sum(dims), group=self.group or dist.group.WORLD) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as torch
        out = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def apply_sync_bn(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``model`` normalised over the ranks of ``group`` (the data-parallel ones)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    return _convert(model, group)


def _convert(module: nn.Module, group) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, group=group)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        module._modules[name] = _convert(child, group)
    return module
