"""Device discovery and backend choice: CUDA, then MPS, then CPU; NCCL on CUDA, gloo elsewhere."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from gpupar.errors import UsageError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """Resolve a --device value. Under a distributed launch each rank takes cuda:LOCAL_RANK."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif mps_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_available():
            raise UsageError("--device mps: MPS is not available on this machine; try --device cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise UsageError(f"--device {spec!r} is not one of: {DEVICE_FORMS}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine; try --device auto or cpu")
    index = int(match.group(1)) if match.group(1) else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA ranks, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def info_lines() -> list[str]:
    """What `gpupar info` prints: versions, devices with memory, backends, CPU cores."""
    lines = [f"torch: {torch.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"CUDA: {torch.version.cuda}")
        try:
            lines.append("NCCL: " + ".".join(map(str, torch.cuda.nccl.version())))
        except Exception:  # NCCL missing from this build
            lines.append("NCCL: not available")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("CUDA: not available")
    if mps_available():
        lines.append("mps: Apple Metal (unified memory)")
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        lines.append(f"cpu: {os.cpu_count()} cores, {total:.1f} GiB")
    except (ValueError, OSError, AttributeError):
        lines.append(f"cpu: {os.cpu_count()} cores")
    backends = [name for name, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available()))
                if ok]
    lines.append("distributed backends: " + (", ".join(backends) or "none"))
    return lines
