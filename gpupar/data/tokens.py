"""A token file as a Dataset: the flat array of token ids that nanoGPT's prepare scripts (and
many pretraining pipelines) write, uint16 or uint32, read in windows, never loaded whole.

Sample i is the window of ``seq_len + 1`` tokens at ``i * seq_len``: the pair (x, y) of int64
tensors [seq_len], y being x shifted by one token (nanoGPT's get_batch, with windows that tile
the file instead of random offsets: each token is a target once per epoch, and a position
means the same samples at any world size). Each window is its own small ``np.memmap``, so
neither the resident memory nor the address space grows with the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gpupar.errors import UsageError

# .bin takes its dtype from --token-dtype (uint16 unless told); .u16 and .u32 say theirs.
TOKEN_SUFFIXES = {".bin": None, ".u16": "uint16", ".u32": "uint32"}
SCAN_TOKENS = 1 << 23  # tokens per chunk when scanning for the largest id (16 MiB of uint16)


def is_token_file(path: str) -> bool:
    return Path(path).suffix.lower() in TOKEN_SUFFIXES


class TokenWindows(Dataset):
    """Windows of a token file; checked on opening: a size that is not a whole number of
    tokens, an empty file, or a --seq-len the file cannot fill are one line each."""

    def __init__(self, path: str, seq_len: int, token_dtype: str = "uint16"):
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--data {path}: file not found (a token file: .bin, .u16 or .u32)")
        dtype = np.dtype(TOKEN_SUFFIXES.get(p.suffix.lower()) or token_dtype)
        size = p.stat().st_size
        if size == 0:
            raise UsageError(f"--data {path}: the token file is empty")
        if size % dtype.itemsize:
            raise UsageError(f"--data {path}: {size} bytes is not a whole number of {dtype.name} tokens "
                             f"({dtype.itemsize} bytes each); a uint32 file is .u32 or --token-dtype uint32")
        self.tokens = size // dtype.itemsize
        if self.tokens < seq_len + 1:
            raise UsageError(f"--seq-len {seq_len} is longer than {path} allows: a window needs {seq_len + 1} "
                             f"tokens and the file holds {self.tokens}")
        self.path, self.seq_len, self.dtype = str(p), seq_len, dtype
        self.windows = (self.tokens - 1) // seq_len

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.windows:
            raise IndexError(f"window {i} of {self.windows}")
        window = np.memmap(self.path, dtype=self.dtype, mode="r", offset=i * self.seq_len * self.dtype.itemsize,
                           shape=(self.seq_len + 1,))
        tokens = torch.from_numpy(window.astype(np.int64))  # a copy: the map closes with ``window``
        return tokens[:-1], tokens[1:]

    def max_token(self) -> int:
        """The largest token id, read in chunks of SCAN_TOKENS (a check before launch)."""
        key = (self.path, self.dtype.name, os.stat(self.path).st_mtime_ns, self.tokens)
        if key not in _MAX_TOKEN:
            largest = 0
            for start in range(0, self.tokens, SCAN_TOKENS):
                count = min(SCAN_TOKENS, self.tokens - start)
                chunk = np.memmap(self.path, dtype=self.dtype, mode="r", offset=start * self.dtype.itemsize,
                                  shape=(count,))
                largest = max(largest, int(chunk.max()))
                del chunk
            _MAX_TOKEN[key] = largest
        return _MAX_TOKEN[key]


_MAX_TOKEN: dict = {}  # one scan per file per process: the launcher checks, then may train here


def check_vocab(windows: TokenWindows, vocab: int, flag: str = "--vocab {}") -> None:
    """Every token id must be a row of the model's embedding: one line naming the size that fits
    (``flag``: how the user sets it, ``--vocab N`` or ``--hf-config vocab_size=N``)."""
    largest = windows.max_token()
    if largest >= vocab:
        raise UsageError(f"{flag.format(vocab)} is too small for {windows.path}: its largest token id is {largest}; "
                         f"use {flag.format(largest + 1)} or more")
