"""Token files and ``--data module:factory``: bad input is one line (exit 2 on the CLI), a GPT
trains on a .bin written here, and a window is read through its own small memory map (the
file is never loaded whole)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpupar.data import sources, tokens
from gpupar.data.sources import load_data_factory
from gpupar.data.tokens import TokenWindows, check_vocab
from gpupar.errors import UsageError
from harness import TESTS, env, gpupar


def _write(path, n, dtype=np.uint16, high=100, seed=0):
    np.random.default_rng(seed).integers(0, high, size=n).astype(dtype).tofile(path)
    return str(path)


def test_token_file_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        TokenWindows(str(tmp_path / "nope.bin"), 16)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 1001)
    with pytest.raises(UsageError, match="1001 bytes is not a whole number of uint16 tokens"):
        TokenWindows(str(odd), 16)
    small = _write(tmp_path / "small.bin", 100)
    with pytest.raises(UsageError, match="--seq-len 100 is longer than"):
        TokenWindows(small, 100)  # a window needs 101 tokens
    with pytest.raises(UsageError, match="--vocab 50 is too small .* largest token id is 99"):
        check_vocab(TokenWindows(small, 16), 50)
    check_vocab(TokenWindows(small, 16), 100)  # ids 0..99 fit a vocabulary of 100


def test_factory_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_data_mod.py").write_text(
        "import torch\n"
        "def number():\n    return 3\n"
        "def broken():\n    raise ValueError('no rows today')\n"
        "def tensors():\n    return torch.zeros(4, 2), torch.zeros(4, 1)\n"
        "not_callable = 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="cannot import module 'no_such_mod_22'"):
        load_data_factory("no_such_mod_22:make")
    with pytest.raises(UsageError, match="returned int; accepted: tensors"):
        load_data_factory("my_data_mod:number")
    with pytest.raises(UsageError, match=r"broken\(\) raised ValueError: no rows today"):
        load_data_factory("my_data_mod:broken")
    with pytest.raises(UsageError, match="has no callable 'not_callable'"):
        load_data_factory("my_data_mod:not_callable")
    X, y = load_data_factory("my_data_mod:tensors")
    assert X.shape == (4, 2) and y.shape == (4, 1)
    assert sources.is_factory("my_data_mod:tensors") and not sources.is_factory("dir/x:y")


def test_windows_are_read_through_small_memory_maps(tmp_path, monkeypatch):
    """Each window maps seq_len + 1 tokens at i * seq_len, nothing more: reading windows of a
    file of 2^20 tokens never maps (or reads) the whole file."""
    path = _write(tmp_path / "big.u32", 1 << 20, dtype=np.uint32, high=50_000)
    mapped = []
    real = np.memmap

    def spy(*args, **kwargs):
        mapped.append((kwargs["offset"], kwargs["shape"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tokens.np, "memmap", spy)
    windows = TokenWindows(path, 64)  # .u32 says its dtype
    assert len(windows) == ((1 << 20) - 1) // 64
    x, y = windows[1000]
    assert mapped == [(1000 * 64 * 4, (65,))]
    whole = np.fromfile(path, dtype=np.uint32)
    assert torch.equal(x, torch.from_numpy(whole[64_000:64_064].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(whole[64_001:64_065].astype(np.int64)))  # y is x shifted by one


def test_gpt_trains_on_a_token_file_and_bad_files_exit_2(tmp_path):
    _write(tmp_path / "tokens.bin", 4000)
    (tmp_path / "odd.bin").write_bytes(b"\1" * 999)
    common = ["--model", "gpt", "--seq-len", "16", "--batch-size", "8", "--max-steps", "4"]
    done, _ = gpupar("train", "--data", "tokens.bin", "--vocab", "128", *common, "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
    steps = (tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()
    assert steps, "no metrics written"
    for data, vocab, expected in (("odd.bin", "128", "not a whole number of uint16 tokens"),
                                  ("tokens.bin", "64", "--vocab 64 is too small")):
        done, _ = gpupar("train", "--data", data, "--vocab", vocab, *common, "--run-dir", "bad", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr


def test_gpt_trains_on_a_token_file_larger_than_its_address_space_limit(tmp_path):
    """The file is larger than the process may map or allocate in all (RLIMIT_AS, set after
    torch's own address space is counted: tests/bounded_tokens.py), so a whole load fails
    there; training on it, shuffled windows from all over the file, works, and the resident
    memory grows by less than a quarter of the file (the shuffle's [windows] permutation,
    8 bytes a window of 64 tokens, the model and its optimizer)."""
    e = {**env(), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # a fixed address space
    args = ["train", "--data", "tokens.bin", "--seq-len", "64", "--model", "gpt", "--batch-size", "8",
            "--max-steps", "3", "--shuffle", "--run-dir", "run"]
    proc = subprocess.run([sys.executable, str(TESTS / "bounded_tokens.py"), str(tmp_path), "512", "--", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=e, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "WHOLE LOAD FAILS" in proc.stdout  # the cap bites: the file cannot be read into memory
    size, cap, baseline = map(int, re.search(r"FILE (\d+) CAP (\d+) BASELINE_RSS (\d+)", proc.stdout).groups())
    assert size > cap and os.path.getsize(tmp_path / "tokens.bin") == size
    assert os.stat(tmp_path / "tokens.bin").st_blocks * 512 < 64 << 20  # sparse: a few MiB on disk
    peak = int(re.search(r"VmHWM (\d+)", proc.stdout).group(1))
    assert peak - baseline < size // 4, (peak, baseline, size)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_token_file_resumes_mid_epoch_at_the_same_window(gpupar_cli, tmp_path):
    """Shuffled windows, interrupted at step 5 of 31 in the epoch: the resumed run reads the
    windows the full run read after step 5 and ends with its weights, bit for bit."""
    from safetensors.torch import load_file as load_weights

    _write(tmp_path / "tokens.bin", 4000)
    flags = ["train", "--data", tmp_path / "tokens.bin", "--model", "gpt", "--layers", 1, "--vocab", 128,
             "--seq-len", 16, "--batch-size", 8, "--shuffle", "--max-steps", 9, "--progress", "false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert gpupar_cli(*flags, "--checkpoint-every", 5, "--run-dir", full)[0] == 0
    code, out, _ = gpupar_cli(*flags, "--resume", full / "checkpoints" / "step-5", "--run-dir", resumed)
    assert code == 0 and "at step 5" in out, out
    a, b = load_weights(full / "model.safetensors"), load_weights(resumed / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
