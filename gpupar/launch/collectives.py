"""Which collective a stuck job was stuck in: each rank's record of the last ones it entered.

A rank that waits in a collective for a peer that never comes fails after ``--timeout``
with gloo's or NCCL's "timed out"; that names neither the peer nor the operation. So every
rank keeps torch's Flight Recorder (a ring buffer of the collectives each process group
entered: operation, sequence number, sizes; ``TORCH_FR_BUFFER_SIZE``, set by the launcher),
and when it fails, or is stopped by the launcher's SIGTERM, it writes the last few entries
to ``$GPUPAR_COLLECTIVES_DIR/rank-R.json``. The launcher reads them all and names the rank
that timed out, the collective it waited in, the ranks that never entered it, and the last
collective every rank finished (``story``). Where the recorder is missing (an older torch),
nothing is written and the launcher's message stays as it was.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

DIR_ENV = "GPUPAR_COLLECTIVES_DIR"
KEEP = 8  # entries written per rank: the stuck one and a few before it


def recorder_env() -> dict[str, str]:
    """The recorder's buffer size (entries per process), under the name this torch reads
    (TORCH_NCCL_TRACE_BUFFER_SIZE before 2.7, NCCL only; newer ones warn that it is deprecated)."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return {"TORCH_FR_BUFFER_SIZE" if (major, minor) >= (2, 7) else "TORCH_NCCL_TRACE_BUFFER_SIZE": "256"}


def _entries() -> list[dict]:
    """The Flight Recorder's entries of this process, oldest first ([] where torch has none)."""
    try:
        import torch.distributed as dist
        from torch._C import _distributed_c10d as c10d

        dumps = []
        if dist.is_initialized() and dist.get_backend() == "nccl" and hasattr(c10d, "_dump_nccl_trace_json"):
            dumps.append(c10d._dump_nccl_trace_json(True, False))
        if hasattr(c10d, "_dump_fr_trace_json"):
            dumps.append(c10d._dump_fr_trace_json(True, False))
        for raw in dumps:
            entries = json.loads(raw).get("entries") or []
            if entries:
                return entries
    except Exception:  # a record is a courtesy: never a reason for another failure
        pass
    return []


def _short(entry: dict) -> dict:
    name = str(entry.get("profiling_name", "?"))
    p2p = "send" in name or "recv" in name
    group = entry.get("process_group") or ["", "?"]
    return {"op": name, "group": str(group[-1]), "seq": int(entry.get("p2p_seq_id" if p2p else "collective_seq_id") or 0),
            "sizes": entry.get("input_sizes"), "state": entry.get("state")}


def record(how: str, timed_out: bool = False) -> None:
    """Write this rank's last collectives where the launcher reads them (a rank of gpupar's launcher only)."""
    directory = os.environ.get(DIR_ENV)
    if not directory or "RANK" not in os.environ:
        return
    entries = [_short(e) for e in _entries()[-KEEP:]]
    body = {"rank": int(os.environ["RANK"]), "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "how": how[:300], "timed_out": timed_out, "entries": entries}
    try:
        path = Path(directory) / f"rank-{body['rank']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)
    except OSError:
        pass


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def watch() -> None:
    """In a rank: when the launcher stops it (SIGTERM), record first, then die of the signal
    as before (the launcher tells a stopped rank from one that failed by how it ended)."""
    if not os.environ.get(DIR_ENV):
        return

    def stopped(signum, frame) -> None:
        record("stopped by the launcher")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    try:
        signal.signal(signal.SIGTERM, stopped)
    except ValueError:  # not the main thread
        pass


def story(directory: str | Path, ranks: int) -> str:
    """The records of this node's ``ranks`` ranks, in words: '' when no rank timed out in a
    recorded collective. "Every rank finished" is said only when every rank left a record.
    A record is a rank's file, so it is read as untrusted: one that does not parse is skipped."""
    try:
        return _story(Path(directory), ranks)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return ""


def _story(directory: Path, ranks: int) -> str:
    records = {}
    for path in Path(directory).glob("rank-*.json"):
        try:
            body = json.loads(path.read_text())
            records[int(body["rank"])] = body
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    if not records:
        return ""
    attempt = max(r.get("attempt", 0) for r in records.values())
    records = {k: r for k, r in records.items() if r.get("attempt", 0) == attempt}
    stuck = sorted(k for k, r in records.items() if r.get("timed_out") and r.get("entries"))
    if not stuck:
        return ""
    waiting = records[stuck[0]]["entries"][-1]
    group, seq = waiting["group"], waiting["seq"]
    parts = [f"rank {stuck[0]} timed out in {_name(waiting)} (sizes {waiting['sizes']})"]
    done = {}
    for rank, body in sorted(records.items()):
        mine = [e for e in body.get("entries", []) if e["group"] == group]
        last = mine[-1] if mine else None
        done[rank] = (last["seq"] - (1 if body.get("timed_out") else 0)) if last else None
        if rank not in stuck and (last is None or last["seq"] < seq):
            parts.append(f"rank {rank} never entered it (its last collective: "
                         f"{_name(last) if last else 'none recorded'}; {body.get('how', '?')})")
    known = [d for d in done.values() if d is not None]
    if len(known) == len(records) == ranks:
        finished = min(known)
        entry = next((e for b in records.values() for e in b.get("entries", [])
                      if e["group"] == group and e["seq"] == finished), None)
        parts.append(f"the last collective every rank finished: {_name(entry) if entry else f'#{finished}'}")
    return "; ".join(parts)


def _name(entry: dict) -> str:
    return f"{entry['op']} #{entry['seq']} of process group {entry['group']}"
