"""An adversarial run of gpupar (issue 26): hostile files, links, signals, full disks,
stuck ranks and inputs that train the wrong thing, each case classified.

    PYTHONPATH=$PWD python tests/adversarial.py            # every case, the counts table
    PYTHONPATH=$PWD python tests/adversarial.py --fast     # the cases without ranks or signals
    PYTHONPATH=$PWD python tests/adversarial.py --only lock --verbose

Point PYTHONPATH at another checkout to measure it (the "before" column):
``git worktree add /tmp/adv-before COMMIT`` and ``PYTHONPATH=/tmp/adv-before python tests/adversarial.py``.

Every case runs gpupar as a user would (``python -m gpupar ...`` in a fresh directory,
bounded by a timeout) and is one of:

- held: the answer the case expects (one line and exit 2 for a refusal; 0 where the run
  should go on; 130/143 on signals), no traceback, nothing lost or written outside;
- data lost: a file that was there before (a run's results, a file outside the run, an
  input) changed or went;
- traceback: a Python traceback on stderr;
- hang: no answer within the case's bound;
- silent wrong: exit 0 where the input should have been refused, or a result that is wrong;
- unclear: the wrong exit code, more than one line, a message that does not name what the
  case needs it to, or a rejected run that left files behind.

The files the cases need (user models, hostile pickles, tampered checkpoints) are made
here, so the script measures any checkout of gpupar, older ones included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import adversarial_faults  # noqa: E402,F401 (registers its cases)
import adversarial_files  # noqa: E402,F401
import adversarial_flags  # noqa: E402,F401
import adversarial_inputs  # noqa: E402,F401
import adversarial_models  # noqa: E402,F401
import adversarial_outputs  # noqa: E402,F401
import adversarial_saves  # noqa: E402,F401
import adversarial_trust  # noqa: E402,F401
from adversarial_kit import CASES, HELD, OUTCOMES, Case, Ctx  # noqa: E402


def run_case(case: Case, root: Path, verbose: bool) -> tuple[str, str]:
    ctx = Ctx(root, root / case.name)
    ctx.dir.mkdir()
    try:
        outcome, detail = case.fn(ctx)
    except Exception:  # the script's own failure: counted, never hidden
        outcome, detail = "error", traceback.format_exc().strip().splitlines()[-1]
    if verbose or outcome != HELD:
        last = ctx.last
        detail += f" | exit {last.code} err {last.err.strip()[-300:]!r}" if last is not None else ""
    return outcome, detail


def run_cases(cases: list[Case], jobs: int = 2, verbose: bool = False) -> list[tuple[Case, str, str]]:
    """Run ``cases`` (``jobs`` at a time) in a fresh temporary directory; (case, outcome, detail) each."""
    root = Path(tempfile.mkdtemp(prefix="gpupar-adv-"))
    try:
        Ctx(root, root).prepare()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(lambda c: (c, *run_case(c, root, verbose)), cases))
    finally:
        Ctx.cleanup(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the cases without ranks or signals")
    parser.add_argument("--smoke", action="store_true", help="only the few cases the pytest test runs")
    parser.add_argument("--only", default=None, help="cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--json", default=None, help="write every case's outcome to this file")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if (not args.fast or c.fast) and (not args.smoke or c.smoke)
             and (args.only is None or args.only in c.name)]
    start = time.monotonic()
    results = run_cases(cases, args.jobs, args.verbose)
    counts = {k: 0 for k in OUTCOMES}
    for case, outcome, detail in results:
        counts[outcome] = counts.get(outcome, 0) + 1
        if args.verbose or outcome != HELD:
            print(f"{outcome:>12}  {case.cls:<10} {case.name}: {detail}")
    print(f"\n{len(results)} cases in {time.monotonic() - start:.0f} s "
          f"(gpupar from {Path(__import__('gpupar').__file__).parent.parent})")
    for key in OUTCOMES:
        print(f"  {key:<13}{counts.get(key, 0):>4}")
    by_class: dict[str, dict[str, int]] = {}
    for case, outcome, _ in results:
        by_class.setdefault(case.cls, {}).setdefault(outcome, 0)
        by_class[case.cls][outcome] += 1
    print("\nby class: " + "; ".join(f"{c}: {dict(v)}" for c, v in sorted(by_class.items())))
    if args.json:
        Path(args.json).write_text(json.dumps([{"case": c.name, "class": c.cls, "outcome": o, "detail": d}
                                               for c, o, d in results], indent=1) + "\n")
    return 0 if counts.get(HELD, 0) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
