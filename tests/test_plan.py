"""gpupar plan and activation checkpointing.

The multi-rank accuracy of the plan (persistent bytes exact per rank, activations and peak
within 10%, step-time order) is benchmarks/plan_accuracy.py's job; here the checks are
in-process, with the machine's numbers injected (no collective probe), plus one spawned
`gpupar verify` with activation checkpointing.
"""

import copy
import json

import pytest
import torch
from torch import nn

from harness import gpupar

from gpupar.config import Config
from gpupar.plan.probe import Machine

MACHINE = Machine("cpu", tflops=0.05, op_overhead_s=5e-6, cores=2,
                  collectives={"2": {"all_reduce": [1e-4, 1e8], "all_gather": [1e-4, 1e8], "send_recv": [5e-5, 2e8]}})


def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    """full and selective give the same gradients as none (to float rounding: the recompute
    runs the same ops), and on the GPT the probe sees full keep fewer bytes than none."""
    from gpupar.models.gpt import GPT
    from gpupar.parallel.activation_checkpoint import apply_activation_checkpointing
    from gpupar.plan.probe import probe_step

    torch.manual_seed(0)
    model, x = GPT(64, 32, 2, 4, 16), torch.randint(0, 64, (4, 16))
    grads, saved = {}, {}
    for mode in ("none", "full", "selective"):
        m = apply_activation_checkpointing(copy.deepcopy(model), mode)
        m(x).square().mean().backward()
        grads[mode] = [p.grad for p in m.parameters()]
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in model.named_parameters()]
        meta = apply_activation_checkpointing(copy.deepcopy(model).to("meta"), mode)
        saved[mode] = probe_step(meta, x.to("meta"), x.to("meta"), lambda o, _: o.sum(),
                                 torch.autocast("cpu", enabled=False)).saved_bytes
    for mode in ("full", "selective"):
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert saved["full"] < saved["selective"] < saved["none"], saved


def test_probe_keeps_a_sent_output_alive_through_backward():
    """A pipeline stage keeps the output it sends until its backward ends, and with keep_output
    the probe does too. A Linear's output (8 x 32 floats), which autograd does not save, then
    counts at the end of forward; a ReLU's, which autograd saves, counts there either way. Both
    now count at backward's peak, which comes after autograd has let go of the ReLU's."""
    from gpupar.plan.probe import probe_step

    off = torch.autocast("cpu", enabled=False)
    x, out_bytes = torch.randn(8, 16), 8 * 32 * 4
    for model, at_forward_end in ((nn.Linear(16, 32), out_bytes), (nn.Sequential(nn.Linear(16, 32), nn.ReLU()), 0)):
        plain, kept = (probe_step(model, x, x, lambda o, _: o.sum(), off, keep_output=keep) for keep in (False, True))
        assert kept.saved_bytes - plain.saved_bytes == at_forward_end
        assert kept.peak_bytes() - plain.peak_bytes() == out_bytes


def test_persistent_bytes_match_the_memory_report_and_fsdp_chunks():
    """Persistent bytes of a single-device run equal memory_report's after one real Adam step;
    FSDP's per-rank shard sizes follow torch.chunk (uneven: 50 rows over 4 ranks = 13,13,13,11)."""
    from gpupar.problem import load_problem
    from gpupar.training.recipe import make_optimizer
    from gpupar.memory import grad_bytes, memory_report
    from gpupar.plan.memory import Context, persistent, shard_bytes
    from gpupar.topology import ParallelDims

    cfg = Config()
    cfg.model.name, cfg.model.layers = "mlp", 3
    model = load_problem(cfg).model
    opt = make_optimizer(model, cfg)
    model(torch.randn(8, 10)).sum().backward()
    grads = grad_bytes(model)
    opt.step()
    measured = memory_report(model, opt, grads, torch.device("cpu"))
    predicted = persistent(Context.build(cfg).model, cfg, ParallelDims(), 0)
    assert (predicted["params"], predicted["grads"], predicted["optimizer"]) == \
        (measured["param_bytes"], measured["grad_bytes"], measured["optim_bytes"])
    w = torch.empty(50, 10)
    assert [shard_bytes(w, 4, r) for r in range(4)] == [c.numel() * 4 for c in torch.chunk(w, 4)] + [0] * 0
    assert sum(shard_bytes(w, 4, r) for r in range(4)) == w.numel() * 4


def test_plan_json_rows_reasons_and_order(gpupar_cli, monkeypatch):
    """--json: every layout at world 1 and 2, sorted by predicted throughput among those that
    fit; one that cannot run says why (tp 2 cannot split 5 heads); a tiny --device-memory fits nothing."""
    import gpupar.plan.probe as probe

    monkeypatch.setattr(probe, "measure_machine", lambda *a, **k: MACHINE)
    code, out, err = gpupar_cli("plan", "--model", "gpt", "--heads", 5, "--hidden", 40, "--world-sizes", "1,2",
                                "--batch-size", 8, "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    layouts = {(r["layout"], r["activation_checkpointing"]) for r in rows}
    for name in ("single", "ddp(dp=2)", "fsdp(dp=2)", "tp(2)", "pp(2, gpipe)", "pp(2, 1f1b)"):
        assert {(name, ac) for ac in ("none", "full", "selective")} <= layouts, name
    tp = next(r for r in rows if r["layout"] == "tp(2)")
    assert not tp["fits"] and "--tp 2 must divide --heads 5" in tp["reason"]
    fit = [r for r in rows if r["fits"]]
    assert fit and [r["samples_per_s"] for r in fit] == sorted((r["samples_per_s"] for r in fit), reverse=True)
    for r in fit:
        assert r["total"] == r["peak"] + r["runtime"]
        assert r["peak"] >= r["params"] + r["optimizer"] + r["activations"]
    gpipe = next(r for r in fit if r["layout"] == "pp(2, gpipe)" and r["activation_checkpointing"] == "none")
    onef = next(r for r in fit if r["layout"] == "pp(2, 1f1b)" and r["activation_checkpointing"] == "none")
    assert onef["activations"] < gpipe["activations"]  # 1F1B holds at most p micro-batches, GPipe all M
    code, out, err = gpupar_cli("plan", "--world-sizes", "1", "--device-memory", "1KiB")
    assert code == 0 and "no: needs" in out


def test_plan_models_the_zero_bubble_schedules(gpupar_cli, monkeypatch):
    """--schedule zbv adds its rows beside gpipe and 1f1b: a rank holds its two stages of the V
    (rank 1: layers 1 and 2, the worst rank, exact bytes), and the step is shorter than 1F1B's
    by its bubble (0 against (p-1)/(M+p-1) = 1/5 at M = 4: same work, so 4/5 of 1F1B's)."""
    import gpupar.plan.probe as probe
    from gpupar.plan.schedules import bubble_fraction, peak_microbatches

    # Free sends and ops: the step is the compute over (1 - bubble), the same compute for both.
    free = Machine("cpu", tflops=0.05, op_overhead_s=0.0, cores=2, collectives={"2": {"send_recv": [0.0, 1e30]}})
    monkeypatch.setattr(probe, "measure_machine", lambda *a, **k: free)
    code, out, err = gpupar_cli("plan", "--model", "mlp", "--layers", 4, "--hidden", 64, "--world-sizes", "2",
                                "--strategy", "pp", "--schedule", "zbv", "--json")
    assert code == 0, err
    rows = {r["layout"]: r for r in json.loads(out)["rows"] if r["activation_checkpointing"] == "none"}
    zbv, onef = rows["pp(2, zbv)"], rows["pp(2, 1f1b)"]
    assert zbv["params"] == (2 * (64 * 64 + 64)) * 4  # stages 1 and 2 of the V, on rank 1
    assert [r["params"] for r in zbv["per_rank"]] == [((10 * 64 + 64) + (64 + 1)) * 4, zbv["params"]]
    assert zbv["step_s"] == pytest.approx(0.8 * onef["step_s"], rel=1e-9)
    assert bubble_fraction("zbv", 2, 4) == 0 and bubble_fraction("1f1b", 2, 4) == pytest.approx(0.2)
    assert bubble_fraction("interleaved-zb", 2, 4) == pytest.approx(1 / 25)  # ZB-H1's third, over 2 chunks
    assert [peak_microbatches("interleaved-1f1b", 2, 8, r) for r in (0, 1)] == [2.5, 1.5]


@pytest.mark.parametrize("flags,named", [
    (("--world-sizes", "0"), "--world-sizes '0'"),
    (("--device-memory", "80XB"), "--device-memory '80XB'"),
    (("--strategy", "zigzag"), "'zigzag' is not one of"),
])
def test_plan_bad_input_is_one_line_exit_2(gpupar_cli, flags, named):
    code, out, err = gpupar_cli("plan", *flags)
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_train_plan_auto_runs_the_layout_it_chose(gpupar_cli, tmp_path, monkeypatch):
    import gpupar.plan.probe as probe

    monkeypatch.setattr(probe, "measure_machine", lambda *a, **k: MACHINE)
    code, out, err = gpupar_cli("train", "--plan", "auto", "--model", "gpt", "--epochs", 1, "--samples", 16,
                                "--run-dir", tmp_path / "r", "--progress", "false")
    assert code == 0, err
    chose = next(line for line in out.splitlines() if line.startswith("gpupar plan: chose"))
    config = (tmp_path / "r" / "config.toml").read_text()
    ac = chose.split("activation checkpointing ")[1].split()[0].rstrip(",(")
    assert f'activation_checkpointing = "{ac}"' in config and "# plan = (unset)" in config


def test_verify_fsdp_with_selective_activation_checkpointing(tmp_path):
    proc, _ = gpupar("verify", "--strategy", "fsdp", "--model", "gpt", "--activation-checkpointing", "selective",
                     "--hidden", 32, "--samples", 64, "--batch-size", 32, "--epochs", 3, "--nproc-per-node", 2, "--run-dir", tmp_path / "v", cwd=tmp_path)
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr


def test_the_meta_probe_sees_attention_as_the_fused_kernels_save_it():
    """On the meta device SDPA would take the math path and save the [B, H, T, T] scores; the
    probe routes it through the fused kernel's shapes, so meta and CPU (a real fused kernel)
    see the same bytes. An H200 measured the GPT's transient to within 1 KiB this way."""
    from gpupar.models.gpt import GPT
    from gpupar.plan.probe import probe_step

    torch.manual_seed(0)
    model, x = GPT(64, 32, 2, 4, 64), torch.randint(0, 64, (4, 64))
    probes = [probe_step(m, x.to(d), x.to(d), lambda o, _: o.sum(),
                         torch.autocast("cpu", enabled=False))
              for m, d in ((model, "cpu"), (copy.deepcopy(model).to("meta"), "meta"))]
    assert probes[1].saved_bytes == probes[0].saved_bytes
    assert probes[1].peak_bytes() == probes[0].peak_bytes()


def test_a_checkpointed_model_is_freed_without_the_cycle_collector():
    """Blocks take a checkpointing subclass instead of a forward stored on themselves (a
    reference cycle): dropped, a trained model's blocks and gradients go at once, as without
    checkpointing. The cycle kept a second model's worth of parameters on an H200."""
    import gc
    import weakref

    from gpupar.models import mlp
    from gpupar.parallel.activation_checkpoint import apply_activation_checkpointing

    for mode in ("full", "selective", "full"):  # the first pass builds torch's lazy state
        model = apply_activation_checkpointing(mlp(10, 32, 4, 1), mode)
        gc.collect()
        gc.disable()
        try:
            model(torch.randn(8, 10)).sum().backward()
            block = weakref.ref(model[2])
            del model
            assert block() is None, mode
        finally:
            gc.enable()


@pytest.mark.parametrize("impl", ["fused", "default"])
def test_optimizer_temporaries_match_what_the_step_allocates(impl):
    """The plan's optimizer temporaries equal the most the real Adam step allocates on the
    CPU (by the allocator's count through the profiler): none when fused, two tensors of the
    largest parameter for torch's for-loop (to the step's few scalars). A regression in the term fails here."""
    from torch.profiler import ProfilerActivity, profile

    from gpupar.training.recipe import make_optimizer
    from gpupar.plan.buffers import optimizer_temporaries
    from gpupar.topology import ParallelDims

    cfg = Config()
    cfg.optim.optimizer_impl = impl
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    opt = make_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the state exists: the profiled step allocates only temporaries
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    running, peak = 0, 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        running += n
        peak = max(peak, running)
    predicted = optimizer_temporaries(model, cfg, ParallelDims(), set(), "cpu", 1.0)
    assert predicted == pytest.approx(peak, abs=64), (predicted, peak)  # to a few 4-byte scalars


def test_fsdp_buffers_replay_fsdp2_allocation_order():
    """Two 256-byte units, S = 2, no activations: the replay of FSDP2's buffers peaks at 896
    bytes. On gloo first at the second unit's reduction: the first unit's prefetched
    all-gather output (256) + the reduce-scatter input (256) + gloo's reduce-scatter
    temporary (256) + the reduced gradient's shard (128). On a GPU (no temporary) at the first
    unit's wait in backward: its prefetched all-gather output (256, released just after) and
    its copied-out parameters (256), the second unit's reduce-scatter input (256) and the
    shard (128)."""
    from gpupar.config import ParallelConfig
    from gpupar.plan.buffers import fsdp_buffers
    from gpupar.plan.probe import StepProbe

    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    root, g = 2, 256
    samples = [(0, 0)] * 4 + [(0, g)] * 2 + [(0, 2 * g)] * 2
    markers = [(0, "forward", root), (0, "forward", 0), (1, "forward_end", 0), (1, "forward", 1),
               (2, "forward_end", 1), (2, "forward_end", root), (3, "backward", root), (3, "backward", 1),
               (5, "reduce", 1), (6, "backward", 0), (7, "reduce", 0)]
    probe = StepProbe(0, 8, samples, 2 * g, markers)
    assert fsdp_buffers(probe, model, ParallelConfig(), 2, "cpu") == 896
    assert fsdp_buffers(probe, model, ParallelConfig(), 2, "cuda") == 896
    samples[4:6] = [(100, g)] * 2  # activations alive at the second unit's reduction: only gloo's peak moves
    assert fsdp_buffers(probe, model, ParallelConfig(), 2, "cpu") == 996
