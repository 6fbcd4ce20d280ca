"""What theory says of each pipeline schedule: its bubble and the activations a rank holds.

Units: F is one micro-batch's forward through one rank's share of the layers; its backward
is an input-gradient part B and a weight-gradient part W, each about F for matmul layers
(one matmul each: ``dX = dY W^T``, ``dW = dY^T X``), so a micro-batch costs 3F per rank and
a step of M micro-batches 3MF of work. The bubble is the idle fraction of the step,
idle / (idle + 3MF). Activation memory is counted in micro-batches of a rank's share of
the layers (a rank with v stages holds 1/v of that per stage chunk).

- GPipe (Huang et al., 2019) and 1F1B (Narayanan et al., 2021, PipeDream-Flush): idle
  (p-1) x 3F, bubble (p-1)/(M+p-1). GPipe holds all M micro-batches; 1F1B at most p - r on
  rank r.
- Interleaved 1F1B (Narayanan et al., 2021, Megatron-LM): v chunks per rank divide the
  warm-up by v: bubble (p-1)/(vM+p-1). Rank r runs (v-1)p + 2(p-1-r) warm-up chunk forwards
  before its first backward, so it holds that plus one chunk, over v.
- Interleaved zero bubble (Qi et al., 2024, "Zero Bubble Pipeline Parallelism", ZB-H1 on v
  chunks): deferring W into the cool-down leaves (p-1) x F of idle, a third of 1F1B's,
  divided by v chunks: bubble (p-1)/(3vM+p-1); memory as interleaved 1F1B's.
- ZBV (the same paper's ZB-V: two stages per rank in a V) and DualPipeV (DeepSeek-V3's
  DualPipe folded into a V): with F = B = W the schedules fill every slot once M >= 2p, so
  the bubble is 0; ZB-V holds p micro-batches (as 1F1B's first rank) and DualPipe p + 1.
  Below M = 2p the warm-up is not covered and no closed form is claimed here (None).
"""

from __future__ import annotations

V_SHAPED = ("zbv", "dualpipev")
INTERLEAVED = ("interleaved-1f1b", "interleaved-zb")


def bubble_fraction(schedule: str, p: int, m: int, v: int = 2) -> float | None:
    """The idle fraction of a step of ``m`` micro-batches on ``p`` ranks (``v`` stages per rank
    for the interleaved schedules); None where theory gives no closed form here."""
    if p == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "interleaved-zb":
        return (p - 1) / (3 * v * m + p - 1)
    if schedule in V_SHAPED:
        return 0.0 if m >= 2 * p else None
    raise ValueError(f"unknown schedule {schedule!r}")


def peak_microbatches(schedule: str, p: int, m: int, rank: int, v: int = 2) -> float | None:
    """The most micro-batches of a rank's share of the layers whose activations ``rank`` holds
    at once (fractions: chunks of 1/v of the rank's layers)."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, p - rank))
    if schedule in INTERLEAVED:
        warmup = (v - 1) * p + 2 * (p - 1 - rank)
        return min(v * m, warmup + 1) / v
    if schedule == "zbv":
        return float(min(m, p))
    if schedule == "dualpipev":
        return float(min(m, p + 1))
    raise ValueError(f"unknown schedule {schedule!r}")
