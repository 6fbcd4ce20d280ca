"""The measurements ``gpupar plan`` builds on: what one step keeps alive, and what this machine does.

Activation probe. One forward and backward of a rank's local model (its pipeline stage,
with tensor-parallel layers at their local width, with activation checkpointing as
planned), at micro-batches of 2 and 4 samples, extended linearly to the real micro-batch
(plan/memory.py): on the CPU when the local model is small (<= 64 MiB of parameters; real
kernels, so attention saves what the fused kernel saves), otherwise
on the meta device (shapes only, no arithmetic, no memory). The meta device has no fused
attention kernel, so there ``scaled_dot_product_attention`` goes through the CPU flash
kernel's shapes (``_fused_attention``): it saves what the GPU's flash and memory-efficient
kernels save, the output and a float32 log-sum-exp per row, never the [B, H, T, T] scores of
the math path. A ``TorchDispatchMode`` sees every op's outputs and follows
their storages (by weak reference) until they die. That gives the bytes alive when forward
ends (what autograd and checkpointing keep for backward: saved tensors, checkpointed block
inputs, selective checkpointing's cached outputs) and the peak during forward and backward
(the saved tensors plus temporaries, the gradients of activations and of parameters). It
is the saved-tensor view of memory, measured by liveness instead of
``saved_tensors_hooks``, because non-reentrant checkpointing keeps its inputs outside them.

Machine probes. A matmul throughput probe (``bench.flops.cpu_matmul_probe``, or the GPU's
data-sheet peak), a per-op dispatch overhead probe, and a short collective probe (all-reduce,
all-gather and send/recv on gloo over loopback, in threads of this process, at each world
size), cached per machine in ``~/.cache/gpupar`` so it runs once.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gpupar.models.outputs import first_output


@dataclass
class StepProbe:
    """One micro-batch's forward and backward on one rank's local model."""

    saved_bytes: int  # alive when forward ends (including its output and loss)
    ops: int  # dispatched ops (a proxy for per-op overhead)
    samples: list = field(default_factory=list)
    """(bytes alive, parameter-gradient bytes accumulated so far) after every op."""
    grads: int = 0  # every parameter gradient's bytes (accumulated by the end of backward)
    markers: list = field(default_factory=list)
    """(index into samples, event, unit) for the FSDP units given to ``probe_step``: "forward"
    (a unit's forward begins), "forward_end", "backward" (the gradient of its output
    arrives) and "reduce" (its last parameter gradient is accumulated), in the order they happen."""

    def peak_bytes(self, grads_scale: float = 1.0, accumulating: bool = False) -> int:
        """Most alive at once during forward and backward, a parameter's gradient counting as
        ``grads_scale`` of its size from the moment it is accumulated (1/S under FSDP, which
        reduce-scatters it at once; 0 under DDP, whose gradients live in its buckets).

        ``accumulating``: a later micro-batch of several (a pipeline's, or --grad-accum's).
        Autograd hands the first micro-batch's gradient to ``.grad`` as it is; a later one
        is computed into a new tensor and added to the ``.grad`` that already exists, so every
        gradient is alive throughout, beside the new one (which the liveness counts)."""
        if accumulating:
            return int(max((live for live, _ in self.samples), default=0) + grads_scale * self.grads)
        return int(max((live + grads_scale * grads for live, grads in self.samples), default=0))


class _Liveness(TorchDispatchMode):
    """Follows the storages of every op's outputs: bytes alive now, and the most ever alive."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude  # storages that existed before (parameters, inputs): views of them cost nothing
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.samples: list[tuple[int, int]] = []
        self.ops = 0
        self.grads = 0  # parameter-gradient bytes accumulated so far

    def live_bytes(self) -> int:
        for key in [k for k, (ref, _) in self.alive.items() if ref.expired()]:
            del self.alive[key]
        return sum(n for _, n in self.alive.values())

    def follow(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage._cdata not in self.exclude:
            self.alive.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.follow(t)
        self.samples.append((self.live_bytes(), self.grads))
        return out


@contextlib.contextmanager
def _fused_attention():
    """On meta tensors, ``F.scaled_dot_product_attention`` (no mask, 4-D) as a fused kernel runs
    it: Dao et al., FlashAttention (2022) keeps the output and the row log-sum-exps and
    recomputes the scores in backward. Patched on the module for the probe's forward, backward
    and checkpoint recomputation alike (the engine runs those outside any Python mode)."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs or query.dim() != 4:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def unit_parameters(model: torch.nn.Module, units) -> list[list[torch.nn.Parameter]]:
    """The parameters each FSDP unit manages (those of its module not inside an earlier unit:
    ``fsdp.pick_blocks`` lists children before parents), and last the root's (the rest)."""
    seen: set[int] = set()
    owned = []
    for module in [*units, model]:
        mine = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in mine)
        owned.append(mine)
    return owned


def probe_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, amp, units=(),
               keep_output: bool = False) -> StepProbe:
    """Run ``loss_fn(model(x), y).backward()`` under the liveness tracker (model and data on
    the same device: meta for shapes only). Parameter gradients are counted apart, from the
    moment each is accumulated, and then dropped (see ``StepProbe.peak_bytes``). ``units``
    (modules that FSDP would shard, the root last) are marked as they run (``StepProbe.markers``).
    ``keep_output``: hold the model's output until backward ends, as a pipeline stage that
    sends it does (torch's ``PipelineStage`` keeps it for the stage's backward)."""
    before = [*model.parameters(), *model.buffers(), x, y]
    tracker = _Liveness({t.untyped_storage()._cdata for t in before})
    markers: list = []
    owned = unit_parameters(model, units)
    unit_of = {id(p): k for k, ps in enumerate(owned) for p in ps}
    pending = [sum(p.requires_grad for p in ps) for ps in owned]

    def mark(event: str, k: int) -> None:
        markers.append((len(tracker.samples), event, k))

    def accumulated(p: torch.Tensor) -> None:
        tracker.grads += p.numel() * p.element_size()
        p.grad = None
        k = unit_of[id(p)]
        pending[k] -= 1
        if pending[k] == 0:
            mark("reduce", k)

    def hooks(k: int, module: torch.nn.Module) -> list:
        def output_hook(_module, _args, out) -> None:
            mark("forward_end", k)
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            arrived: list[bool] = []

            def grad_hook(_grad) -> None:  # returns None: the gradient is left as it is
                if not arrived:
                    arrived.append(True)
                    mark("backward", k)

            for t in outputs:
                t.register_hook(grad_hook)

        return [module.register_forward_pre_hook(lambda _m, _a: mark("forward", k)),
                module.register_forward_hook(output_hook)]

    # Checkpointing keeps each block's copy of the CPU generator's state (``preserve_rng_state``)
    # until the block's backward: a tensor made outside the dispatcher, so followed here.
    get_rng_state = torch.get_rng_state

    def followed_rng_state() -> torch.Tensor:
        state = get_rng_state()
        tracker.follow(state)
        return state

    handles = [h for k, module in enumerate([*units, model]) for h in hooks(k, module)]
    for p in model.parameters():
        p.grad = None
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(accumulated))
    torch.get_rng_state = followed_rng_state
    try:
        with tracker, _fused_attention():
            with amp:
                out = model(x)
                loss = loss_fn(first_output(out), y)
            if not keep_output:
                del out
            saved = tracker.live_bytes()
            loss.backward()
        del loss
    finally:
        torch.get_rng_state = get_rng_state
        for h in handles:
            h.remove()
    return StepProbe(saved, tracker.ops, tracker.samples, tracker.grads, markers)


# --------------------------------------------------------------------------- machine


@dataclass
class Machine:
    """What this machine does, measured: the numbers of the time model."""

    device_type: str
    tflops: float  # dense matmul throughput of the whole device (CPU: all cores) in the run's precision
    op_overhead_s: float  # per dispatched op (Python + dispatcher + kernel launch)
    cores: int
    collectives: dict = field(default_factory=dict)
    """{world: {"all_reduce" | "all_gather" | "send_recv": [latency_s, bytes_per_s]}}"""
    dispatch: dict = field(default_factory=dict)
    """{"tp_layer_s", "fsdp_unit_s"}: DTensor's and FSDP2's Python per layer and step (plan.dispatch)"""

    def collective_time(self, kind: str, world: int, nbytes: float) -> float:
        """Seconds for one collective of ``nbytes`` (per rank's full buffer) at ``world`` ranks."""
        if world <= 1 or nbytes <= 0:
            return 0.0
        known = self.collectives.get(str(world)) or self.collectives.get(world)
        if known is None:  # the nearest measured world size, scaled by the ring's (W-1)/W traffic
            sizes = sorted(int(w) for w in self.collectives) or [2]
            near = min(sizes, key=lambda w: abs(w - world))
            known = self.collectives.get(str(near)) or self.collectives.get(near) or {}
        lat, bw = known.get(kind if kind != "reduce_scatter" else "all_gather", (50e-6, 1e9))
        return lat + nbytes / bw


PROBE_VERSION = 2  # bumped when the probes change: an older cache is not read


def cache_path() -> Path:
    base = Path(os.environ.get("GPUPAR_CACHE", Path.home() / ".cache" / "gpupar"))
    return base / f"machine-{platform.node()}-torch{torch.__version__}-v{PROBE_VERSION}.json"


def measure_machine(device_type: str, precision: str, worlds: list[int], cache: bool = True) -> Machine:
    """This machine's numbers: collectives and DTensor/FSDP2 dispatch from the cache (or short
    probes, then cached); matmul and per-op overhead measured now (they follow the machine's
    current load)."""
    from gpupar.plan.dispatch import probe_dispatch

    path = cache_path()
    stored = json.loads(path.read_text()) if cache and path.is_file() else {}
    collectives = stored.get("collectives", {})
    missing = [w for w in worlds if w > 1 and str(w) not in collectives]
    for w in missing:
        collectives[str(w)] = probe_collectives(w)
    dispatch = stored.get("dispatch")
    probe_now = dispatch is None and device_type == "cpu" and max(worlds) > 1
    if probe_now:
        dispatch = probe_dispatch()
    if cache and (missing or probe_now):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"collectives": collectives, **({"dispatch": dispatch} if dispatch else {})},
                                   indent=1))
    if device_type == "cuda":
        from gpupar.measure.flops import gpu_peak_tflops

        tflops = gpu_peak_tflops(torch.cuda.get_device_name(), precision) or 100.0
        overhead = 10e-6
        dispatch = {}  # the host's Python runs ahead of the GPU's kernels: not priced (see plan.dispatch)
    else:
        from gpupar.measure.flops import cpu_matmul_probe

        tflops = cpu_matmul_probe(precision, seconds=0.2, n=512)
        overhead = probe_op_overhead()
    return Machine(device_type, tflops, overhead, os.cpu_count() or 1, collectives, dispatch or {})


def probe_op_overhead(n: int = 2000) -> float:
    """Seconds per tiny op: what a small model's step is made of."""
    a = torch.zeros(4)
    start = time.perf_counter()
    for _ in range(n):
        a = a + 1
    return (time.perf_counter() - start) / n


def probe_collectives(world: int, sizes: tuple[int, ...] = (1 << 12, 1 << 20), repeats: int = 10) -> dict:
    """Latency and bandwidth of all-reduce, all-gather and send/recv among ``world`` gloo ranks
    on loopback, as threads of this process (a few seconds at most): a line through two sizes."""
    store = torch.distributed.HashStore()
    results: dict[str, dict[int, float]] = {"all_reduce": {}, "all_gather": {}, "send_recv": {}}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            pg = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("probe", store), rank, world,
                                                    timedelta(seconds=30))
            for size in sizes:
                t = torch.zeros(size // 4)
                gathered = [torch.zeros(size // 4) for _ in range(world)]
                for kind in results:
                    best = float("inf")
                    for _ in range(repeats):
                        pg.barrier().wait()
                        start = time.perf_counter()
                        if kind == "all_reduce":
                            pg.allreduce([t]).wait()
                        elif kind == "all_gather":
                            pg.allgather([gathered], [t]).wait()
                        elif rank % 2 == 0 and rank + 1 < world:
                            pg.send([t], rank + 1, 0).wait()
                        elif rank % 2 == 1:
                            pg.recv([t], rank - 1, 0).wait()
                        best = min(best, time.perf_counter() - start)
                    if rank == 0:
                        results[kind][size] = best
            pg.barrier().wait()
        except BaseException as exc:  # surfaced in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    fitted = {}
    small, large = sizes
    for kind, times in results.items():
        # The fastest of the repeats at each size (a stall of a rank on a shared CPU only adds):
        # the small size is the latency, the large one's excess over it the bandwidth.
        latency = times[small]
        bw = (large - small) / max(times[large] - latency, 1e-6)
        fitted[kind] = [max(latency, 1e-6), bw]
    return fitted


def machine_dict(m: Machine) -> dict:
    return asdict(m)
