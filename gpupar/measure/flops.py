"""Model FLOPs of a step and the peak they are measured against, for MFU.

FLOPs. ``torch.utils.flop_counter.FlopCounterMode`` counts one forward and backward of the
whole global batch on the unwrapped model (on the meta device when it can, so nothing is
computed). These are the model FLOPs of MFU as Chowdhery et al. define it (PaLM, 2022,
appendix B): work the model needs, not what a strategy adds (recomputation, communication).
For Linear layers that is ~6 x weights x samples (Kaplan et al., 2020): 2 for forward, 4 for
the two backward matmuls. The peak is the device's dense peak for the run's precision, from
the table below, times the number of GPUs. On CPU every rank runs a short matmul probe with
its own threads just before training, all ranks at once, and the peak is their sum: what
this combination's cores can do at that moment (a shared, busy machine under-reads a peak
measured once beforehand, and MFU would pass 100%).
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets:
# (name fragment, bf16/fp16 tensor cores, fp32 without TF32). The first fragment that
# appears in the device name wins, so the more specific names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # SXM / HBM3
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),  # fp16 only; no bf16 tensor cores
    ("T4", 65.0, 8.1),
)

def count_step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> int:
    """FLOPs of one forward and backward of ``model`` on the batch ``x`` (optimizer excluded).

    Runs on the meta device when the model allows it (shapes only, no arithmetic); falls
    back to a real step on a copy of the model.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpupar.models.outputs import first_output

    def count(m, xs, ys, fake: bool = False) -> int:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            with FlopCounterMode(display=False) as counter:
                loss_fn(first_output(m(xs)), ys).backward()
        return int(counter.get_total_flops())

    meta = (copy.deepcopy(model).to("meta"), x.to("meta"), y.to("meta"))
    try:
        return count(*meta)
    except Exception:  # data-dependent Python on values: Hugging Face's mask checks skip a fake tensor's
        try:
            return count(*meta, fake=True)
        except Exception:
            if any(p.is_meta for p in model.parameters()):
                raise
            return count(copy.deepcopy(model), x, y)

def gpu_peak_tflops(name: str, precision: str) -> float | None:
    for fragment, half, fp32 in GPU_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            return half if precision in ("bf16", "fp16") else fp32
    return None

def cpu_matmul_probe(precision: str, seconds: float = 0.5, n: int = 1024) -> float:
    """Best observed TFLOP/s of an n x n matmul with all of this process's threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (a slow one, on a busy machine, once left no time to measure: a rate of 0)
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:  # at least one timed product
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best / 1e12
