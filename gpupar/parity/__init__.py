"""gpupar verify: prove that a parallel run trains the same model as one device
(``harness``: the runs; ``noise``: what a run records for it; ``verdict``: the judgement)."""

from gpupar.parity.harness import default_rtol, model_notes, run_verify
from gpupar.parity.verdict import Verdict, compare, report

__all__ = ["Verdict", "compare", "default_rtol", "model_notes", "report", "run_verify"]
