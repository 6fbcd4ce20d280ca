"""fp16 loss scaling across a pipeline: one inf check for every stage.

``torch.amp.GradScaler`` multiplies the loss by a scale S so that fp16 gradients do not
underflow, then, before the optimizer step, divides the gradients by S and checks them for
Inf/NaN: a step with any non-finite gradient is skipped and S halves; 2000 finite steps in
a row double it. Under a pipeline each rank holds only its stages' gradients, so each
rank's own check sees only part of the model. If stage 1 overflowed and stage 0 did not,
stage 0 would step while stage 1 skipped, and their scales would drift apart.
``PipelineGradScaler`` takes the maximum of the found-inf flags over the pipeline's ranks
(one all-reduce of a scalar, no host read), so every stage skips or steps together and all
keep the same scale. Within a stage, DTensor gradients (FSDP, TP) already reduce their
flags over their own mesh (torch's ``found_inf_reduce_handler``). This is the extension
point torch's own ``ShardedGradScaler`` uses for FSDP1.

Only the last stage computes the loss, so only it calls ``scale``; every stage starts its
scale when the scaler is made, at the same initial value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class PipelineGradScaler(torch.amp.GradScaler):
    def __init__(self, device: torch.device, pp_group: dist.ProcessGroup, comm_device: torch.device, **kwargs):
        super().__init__(device.type, **kwargs)
        self.pp_group, self.comm_device = pp_group, comm_device
        if self._enabled:  # every stage holds the scale from the start: only the last one calls scale()
            self._lazy_init_scale_growth_tracker(device)

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        if not per_device:  # no gradients here: the flag still joins the all-reduce
            per_device = {found_inf.device: found_inf}
        flag = torch.stack([f.to(self.comm_device) for f in per_device.values()]).amax()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pp_group)  # any stage's Inf skips every stage
        for f in per_device.values():
            f.copy_(flag)
        return per_device
