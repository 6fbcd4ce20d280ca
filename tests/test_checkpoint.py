"""Checkpoints: exact resume, atomic commit, crash during save, resharding, export, elastic
restarts, NaN guard and safe loading. Multi-process checks spawn real gloo ranks."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import env, gpupar

QUIET = ("--progress", "false")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir() if p.name[5:].isdigit())


# --- single device, in-process ---------------------------------------------------------------

def test_resume_after_40_epochs_equals_a_plain_100_epoch_run_bitwise(gpupar_cli, tmp_path):
    run, plain = tmp_path / "R", tmp_path / "plain"
    code, out, _ = gpupar_cli("train", "--epochs", 40, "--checkpoint-every", 10, "--keep-last", 2, "--run-dir", run)
    assert code == 0
    assert steps(run) == [30, 40]  # --keep-last 2 pruned step-10 and step-20 after newer commits
    assert all((run / "checkpoints" / f"step-{s}" / "COMPLETE").is_file() for s in (30, 40))
    code, out, _ = gpupar_cli("train", "--epochs", 100, "--resume", "auto", "--run-dir", run)
    assert code == 0 and f"Resumed from {run}/checkpoints/step-40 at step 40" in out
    assert "Epoch [20/100]" not in out and "Epoch [100/100], Loss: 0.0606" in out
    assert gpupar_cli("train", "--run-dir", plain)[0] == 0
    assert_bitwise_equal(weights(run), weights(plain))
    logged = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [20, 40, 60, 80, 100]  # the resumed run keeps the first part's metrics


def test_mid_epoch_resume_with_shuffle_schedule_and_accumulation_is_bitwise(gpupar_cli, tmp_path):
    """Resuming at step 47 (epoch 10, batch 2 of 5) restores the data position, the Adam state
    and the cosine schedule; the schedule's length is the same config's, as after a crash."""
    flags = ["--epochs", 16, "--batch-size", 200, "--shuffle", "--grad-accum", 2, "--lr-schedule", "cosine",
             "--warmup-steps", 5, "--model", "mlp", "--hidden", 16, *QUIET]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert gpupar_cli("train", *flags, "--checkpoint-every", 47, "--run-dir", full)[0] == 0
    trainer = json.loads((full / "checkpoints/step-47/trainer.json").read_text())
    assert trainer["position"] == {"step": 47, "epoch": 9, "batch": 2} and trainer["scheduler"]["last_epoch"] == 47
    code, out, _ = gpupar_cli("train", *flags, "--resume", full / "checkpoints/step-47", "--run-dir", resumed)
    assert code == 0, out
    assert_bitwise_equal(weights(resumed), weights(full))


def test_resume_errors_name_the_problem(gpupar_cli, tmp_path):
    run = tmp_path / "R"
    assert gpupar_cli("train", "--epochs", 4, "--checkpoint-every", 2, "--run-dir", run)[0] == 0
    ckpt = run / "checkpoints/step-4"
    cases = {
        "missing": (tmp_path / "nope", "no such checkpoint directory"),
        "another model": (ckpt, "parameter 'fc1.weight' has shape [50, 10] in the checkpoint, "
                                "the model expects [60, 10]"),
    }
    for name, (path, message) in cases.items():
        code, _, err = gpupar_cli("train", "--hidden", 60, "--resume", path, "--run-dir", tmp_path / name)
        assert code == 2 and message in err, (name, err)
    corrupt = tmp_path / "corrupt/checkpoints/step-4"
    shutil.copytree(ckpt, corrupt)
    (corrupt / ".metadata").write_bytes(b"not a pickle at all")
    code, _, err = gpupar_cli("train", "--resume", corrupt, "--run-dir", tmp_path / "c")
    assert code == 2 and "corrupt checkpoint: .metadata does not match the SHA-256" in err, err
    shutil.copytree(ckpt, corrupt.with_name("step-6"))
    next(corrupt.with_name("step-6").glob("__0_0.distcp")).write_bytes(b"truncated")
    code, _, err = gpupar_cli("train", "--resume", corrupt.with_name("step-6"), "--run-dir", tmp_path / "d")
    assert code == 2 and "__0_0.distcp" in err and len(err.strip().splitlines()) == 1, err  # names the bad shard
    partial = tmp_path / "p/checkpoints/step-8"
    shutil.copytree(ckpt, partial)
    (partial / "COMPLETE").unlink()
    code, _, err = gpupar_cli("train", "--resume", partial, "--run-dir", tmp_path / "p")
    assert code == 2 and "incomplete checkpoint (no COMPLETE marker" in err
    for bad, message in ((["--keep-last", 1], "--keep-last 1 must be >= 2"),
                         (["--on-nan", "ignore"], "--on-nan 'ignore' is not one of: stop, skip"),
                         (["--checkpoint-every", 0], "--checkpoint-every 0 must be a positive integer")):
        code, _, err = gpupar_cli("train", *bad)
        assert code == 2 and message in err


def test_crash_during_save_leaves_a_partial_dir_that_resume_ignores(tmp_path):
    """SIGKILL after step-20's files are written but before the commit: step-20.tmp stays behind,
    and --resume auto continues from step-10, ending equal to an uninterrupted run."""
    run = tmp_path / "R"
    crash = ("import os, signal, sys\n"
             "import gpupar.checkpoint as r\n"
             "commit = r.commit\n"
             "def dying_commit(tmp, final):\n"
             "    if final.name == 'step-20':\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    commit(tmp, final)\n"
             "r.commit = dying_commit\n"
             "from gpupar.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", crash, "train", "--epochs", "30", "--checkpoint-every", "10",
                           "--run-dir", str(run)], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == -9
    assert steps(run) == [10] and (run / "checkpoints/step-20.tmp/.metadata").is_file()
    assert not (run / "model.safetensors").exists()
    proc, _ = gpupar("train", "--epochs", 30, "--checkpoint-every", 10, "--resume", "auto", "--run-dir", run,
                     cwd=tmp_path)
    assert proc.returncode == 0 and "Resumed from" in proc.stdout and "step-10 at step 10" in proc.stdout
    assert steps(run) == [10, 20, 30] and not (run / "checkpoints/step-20.tmp").exists()
    plain, _ = gpupar("train", "--epochs", 30, "--run-dir", tmp_path / "plain", cwd=tmp_path)
    assert plain.returncode == 0
    assert_bitwise_equal(weights(run), weights(tmp_path / "plain"))


def test_nan_in_gradients_stops_without_a_nan_checkpoint_or_is_skipped(gpupar_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_NAN", "grad")
    model = ("--model", "user_models:non_finite_at_step3", "--epochs", 6, "--checkpoint-every", 1, "--keep-last", 10)
    code, _, err = gpupar_cli("train", *model, "--run-dir", tmp_path / "stop")
    assert code == 1 and "gradients became non-finite at step 3 (epoch 3)" in err
    assert steps(tmp_path / "stop") == [1, 2]  # nothing written at or after the bad step
    code, out, _ = gpupar_cli("train", *model, "--on-nan", "skip", "--run-dir", tmp_path / "skip")
    assert code == 0 and "Step 3: non-finite gradients; skipped on all ranks (--on-nan skip)" in out
    assert json.loads((tmp_path / "skip/summary.json").read_text())["skipped_steps"] == [3]
    # The skipped step changed nothing: step-3 holds the weights of step-2.
    step2 = tmp_path / "step2.safetensors"
    step3 = tmp_path / "step3.safetensors"
    assert gpupar_cli("export", "--checkpoint", tmp_path / "skip/checkpoints/step-2", "--out", step2)[0] == 0
    assert gpupar_cli("export", "--checkpoint", tmp_path / "skip/checkpoints/step-3", "--out", step3)[0] == 0
    assert_bitwise_equal(load_file(str(step2)), load_file(str(step3)))
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "skip").values())


class Canary:
    """A pickle that would create a file when unpickled unsafely."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickles_never_run(gpupar_cli, tmp_path):
    from gpupar.safe_dcp import seal
    canary = tmp_path / "canary"
    # The planted pickle is a live exploit: an unsafe load really would create the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Canary(probe)))
    assert probe.exists()

    # 1. As weights: a .pt "state dict" for predict.
    run = tmp_path / "R"
    assert gpupar_cli("train", "--epochs", 2, "--checkpoint-every", 2, "--run-dir", run)[0] == 0
    torch.save({"fc1.weight": Canary(canary)}, run / "evil.pt")
    torch.save({"X": torch.rand(3, 10)}, tmp_path / "x.pt")
    code, _, err = gpupar_cli("predict", "--weights", run / "evil.pt", "--data", tmp_path / "x.pt",
                              "--out", tmp_path / "p.csv")
    assert code == 2 and ("refused to load; only plain tensors are accepted (weights_only=True): "
                          "it references posix.system") in err

    # 2. As a checkpoint's pickled .metadata, for --resume and export.
    evil = tmp_path / "evil/checkpoints/step-2"
    shutil.copytree(run / "checkpoints/step-2", evil)
    (evil / ".metadata").write_bytes(pickle.dumps(Canary(canary)))
    seal(evil)  # an attacker rewrites the hashes too: the safe reader must hold on its own
    code, _, err = gpupar_cli("train", "--resume", evil, "--run-dir", tmp_path / "evil")
    assert code == 2 and "unsafe checkpoint metadata (refused to load posix.system" in err
    code, _, err = gpupar_cli("export", "--checkpoint", evil, "--out", tmp_path / "e.safetensors")
    assert code == 2 and "refused to load posix.system" in err

    # 3. As a non-tensor value inside the checkpoint data (DCP stores those as pickles).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from gpupar.checkpoint import COMPLETE
    sneaky = tmp_path / "sneaky/checkpoints/step-2"
    shutil.copytree(run / "checkpoints/step-2", sneaky)
    model = torch.nn.Sequential()
    model.fc1, model.relu, model.fc2 = torch.nn.Linear(10, 50), torch.nn.ReLU(), torch.nn.Linear(50, 1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 10)).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = Canary(canary)
    for f in sneaky.glob("*.distcp"):
        f.unlink()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=sneaky, no_dist=True)
    assert (sneaky / COMPLETE).is_file()
    seal(sneaky)
    code, _, err = gpupar_cli("train", "--resume", sneaky, "--run-dir", tmp_path / "sneaky")
    assert code == 2 and "cannot load it into this model and optimizer" in err
    assert "refused to load optim.param_groups.0.lr: it references posix.system, which could run code" in err

    assert not canary.exists()


def test_torch_older_than_2_6_is_refused(gpupar_cli, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    code, _, err = gpupar_cli("info")
    assert code == 2 and "torch 2.5.1 is too old; gpupar needs torch>=2.6" in err


# --- several processes: resharding, elastic restarts ------------------------------------------

DDP_FLAGS = ("--epochs", 8, "--batch-size", 200, "--shuffle", "--model", "user_models:killable")


def _close(a: dict, b: dict) -> None:
    for name in a:  # DDP vs one device: fp32 summation order only (as in gpupar verify)
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_reshard_ddp2_to_single_and_back_and_export(tmp_path, gpupar_cli):
    """The ranks run in their own processes; the one-device runs here, through the CLI's main."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc, _ = gpupar("train", *DDP_FLAGS, "--strategy", "ddp", "--nproc-per-node", 2, "--checkpoint-every", 20,
                     "--run-dir", ddp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    code, _, err = gpupar_cli("train", *DDP_FLAGS, "--checkpoint-every", 20, "--run-dir", single)
    assert code == 0, err
    assert json.loads((ddp / "checkpoints/step-20/trainer.json").read_text())["world_size"] == 2

    # DDP W=2 -> single: loading the final checkpoint gives DDP's weights exactly ...
    code, out, err = gpupar_cli("train", *DDP_FLAGS, "--resume", ddp / "checkpoints/step-40", "--run-dir", tmp_path / "a")
    assert code == 0 and "saved by ddp(dp=2) on 2 rank(s)" in out, err
    assert_bitwise_equal(weights(tmp_path / "a"), weights(ddp))
    # ... and training continues from step 20 on one device to the same result as DDP.
    code, _, err = gpupar_cli("train", *DDP_FLAGS, "--resume", ddp / "checkpoints/step-20", "--run-dir", tmp_path / "b")
    assert code == 0, err
    _close(weights(tmp_path / "b"), weights(ddp))

    # single -> DDP W=2, continuing from step 20.
    proc, _ = gpupar("train", *DDP_FLAGS, "--strategy", "ddp", "--nproc-per-node", 2,
                     "--resume", single / "checkpoints/step-20", "--run-dir", tmp_path / "c", cwd=tmp_path)
    assert proc.returncode == 0 and "saved by single on 1 rank(s)" in proc.stdout, proc.stderr
    _close(weights(tmp_path / "c"), weights(single))

    # Export of a DDP checkpoint: one file, the full weights, usable by predict.
    out = tmp_path / "export/model.safetensors"
    code, _, err = gpupar_cli("export", "--checkpoint", ddp / "checkpoints/step-40", "--out", out)
    assert code == 0, err
    assert_bitwise_equal(load_file(str(out)), weights(ddp))
    torch.save({"X": torch.rand(7, 10)}, tmp_path / "x.pt")
    code, _, err = gpupar_cli("predict", "--weights", out, "--data", tmp_path / "x.pt", "--out", tmp_path / "p.csv",
                              "--model", "user_models:killable")  # a user factory is named, never read
    assert code == 0 and len((tmp_path / "p.csv").read_text().splitlines()) == 8, err


def _gpupar_processes(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_sigkilled_worker_restarts_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Rank 1 is SIGKILLed during step 12; TorchElastic restarts both ranks, which resume from
    step-10 on their own and end bitwise equal to an uninterrupted run."""
    ddp = ("--strategy", "ddp", "--nproc-per-node", 2, "--checkpoint-every", 5)
    plain, _ = gpupar("train", *DDP_FLAGS, *ddp, "--run-dir", tmp_path / "plain", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    monkeypatch.setenv("TEST_KILL_RANK1_AT", "13")  # forward 1 is the shape check: 13 is step 12
    run = tmp_path / "R"
    proc, _ = gpupar("train", *DDP_FLAGS, *ddp, "--max-restarts", 1, "--run-dir", run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Resumed from" in proc.stdout and "step-10 at step 10 (saved by ddp(dp=2) on 2 rank(s))" in proc.stdout
    assert_bitwise_equal(weights(run), weights(tmp_path / "plain"))

    monkeypatch.setenv("TEST_KILL_ALWAYS", "1")  # dies again after every restart
    run = tmp_path / "exhausted"
    proc, _ = gpupar("train", *DDP_FLAGS, *ddp, "--max-restarts", 1, "--run-dir", run, cwd=tmp_path)
    assert proc.returncode == 1
    assert "training failed: rank 1 failed (signal SIGKILL) after 1 restart(s)" in proc.stderr
    assert _gpupar_processes(str(run)) == []  # no orphaned workers


def test_reshard_ddp2_to_fsdp4_to_single_and_tp2_to_single(tmp_path, gpupar_cli):
    """DCP checkpoints hold full logical tensors, so any strategy and world size can load them."""
    ddp, fsdp, tp = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "tp"
    proc, _ = gpupar("train", *DDP_FLAGS, "--strategy", "ddp", "--nproc-per-node", 2, "--checkpoint-every", 20,
                     "--run-dir", ddp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # DDP W=2 -> FSDP W=4: continue from step 20 with every tensor now sharded four ways.
    proc, _ = gpupar("train", *DDP_FLAGS, "--strategy", "fsdp", "--nproc-per-node", 4, "--checkpoint-every", 20,
                     "--resume", ddp / "checkpoints/step-20", "--run-dir", fsdp, cwd=tmp_path)
    assert proc.returncode == 0 and "saved by ddp(dp=2) on 2 rank(s)" in proc.stdout, proc.stderr
    _close(weights(fsdp), weights(ddp))  # same data and order; fp32 reduction order only
    # FSDP W=4 -> single: the sharded step-40 checkpoint loads into one plain model exactly.
    code, out, err = gpupar_cli("train", *DDP_FLAGS, "--resume", fsdp / "checkpoints/step-40", "--run-dir", tmp_path / "s")
    assert code == 0 and "saved by fsdp(dp=4) on 4 rank(s)" in out, err
    assert_bitwise_equal(weights(tmp_path / "s"), weights(fsdp))
    # TP 2 -> single: DTensor shards of a tensor-parallel run, loaded whole.
    tp_flags = ("--epochs", 40, "--checkpoint-every", 20)
    proc, _ = gpupar("train", *tp_flags, "--tp", 2, "--nproc-per-node", 2, "--run-dir", tp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    code, out, err = gpupar_cli("train", *tp_flags, "--resume", tp / "checkpoints/step-40", "--run-dir", tmp_path / "t")
    assert code == 0 and "saved by tp(2) on 2 rank(s)" in out, err
    assert_bitwise_equal(weights(tmp_path / "t"), weights(tp))
