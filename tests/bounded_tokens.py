"""`gpupar train --data tokens.bin` under an address-space limit that the file exceeds.

tests/test_data_tokens.py runs this as ``python bounded_tokens.py DIR HEADROOM_MIB -- ARGS``.
After torch and gpupar are imported (their own address space measured, not guessed), it
caps the address space (RLIMIT_AS) at what they take plus HEADROOM, writes a sparse token
file larger than that cap (a few MiB on disk), shows that loading it whole fails under the
cap, then runs the CLI in this process and prints its peak resident memory (VmHWM).
"""

import atexit
import importlib
import resource
import runpy
import sys
from pathlib import Path

import numpy as np

for module in ("gpupar.cli", "gpupar.job"):  # imported before the cap: their address space is the baseline
    importlib.import_module(module)


def status(key: str) -> int:
    """A /proc/self/status figure in bytes."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    out, headroom = Path(sys.argv[1]), int(sys.argv[2]) << 20
    args = sys.argv[sys.argv.index("--") + 1:]
    baseline_size, baseline_rss = status("VmSize"), status("VmRSS")
    cap = baseline_size + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    size = cap + (256 << 20)  # bigger than the cap, and so than anything loaded whole could fit in
    rng = np.random.default_rng(0)
    with open(out / "tokens.bin", "wb") as f:
        f.truncate(size)  # holes read as token 0; every 64 MiB, 256 KiB of random tokens
        for offset in range(0, size, 64 << 20):
            f.seek(offset)
            f.write(rng.integers(0, 64, size=1 << 17).astype(np.uint16).tobytes())
    try:
        np.fromfile(out / "tokens.bin", dtype=np.uint16)
        print("WHOLE LOAD FITS", flush=True)
    except MemoryError:
        print("WHOLE LOAD FAILS", flush=True)
    print(f"FILE {size} CAP {cap} BASELINE_RSS {baseline_rss}", flush=True)
    atexit.register(lambda: print(f"VmHWM {status('VmHWM')}", flush=True))
    sys.argv = ["gpupar", *args]
    runpy.run_module("gpupar", run_name="__main__")


if __name__ == "__main__":
    main()
