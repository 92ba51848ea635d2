"""run_code costs, each beside its floor from the same run and sandbox:

- a trivial cell ``1`` in a running context, beside a bare ``commands.run(["true"])`` (the
  exec round trip every cell rides on): the ratio is what the cell path adds; and an exec
  of ``python3 -I -S -c pass``, what each cell cost when its client was Python;
- a new context's first cell (interpreter start included);
- with ``--image python-data``: the first cell of a new sandbox importing numpy, pandas and
  matplotlib in its default context (warm: the template's snapshot has that interpreter
  running with them imported) beside the same cell in a fresh context of the same
  sandbox (cold: Python's start plus the imports).

    .venv/bin/python bench/code.py [--image python] [--rounds 5] [--json]

Uses the usual MVM_HOME (mvmd is started if needed). Medians with min-max. The issue's
targets are qualitative ("a trivial cell much faster", "the first cell does not pay the
start and imports"), so each row's ratio to its floor is the figure to watch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import mvm

HEAVY = "import numpy, pandas, matplotlib.pyplot"
PY_START = ["python3", "-I", "-S", "-c", "pass"]


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(image: str, rounds: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}

    def add(name: str, fn: Callable[[], object]) -> None:
        rows.setdefault(name, []).append(timed(fn))

    res = mvm.resources(memory_mb=1024)
    if image == "python-data":
        for _ in range(rounds):  # a new sandbox each round: its first cell is what counts
            with mvm.Sandbox.create(image, resources=res) as sb:
                add("warm: new sandbox's first cell (imports)", lambda: sb.run_code(HEAVY))
                add("floor: commands.run(['true'])", lambda: sb.commands.run(["true"]))
                ctx = sb.create_context()
                add(
                    "cold: new context's first cell (imports)",
                    lambda c=ctx: sb.run_code(HEAVY, context=c),  # type: ignore[misc]
                )
    with mvm.Sandbox.create(image, resources=res) as sb:
        sb.commands.run(["true"])  # warm the exec path once
        sb.run_code("1")
        for _ in range(rounds):
            add("floor: commands.run(['true'])", lambda: sb.commands.run(["true"]))
            add("trivial cell `1`", lambda: sb.run_code("1"))
            # what every cell paid before the bash client: a Python start per cell
            add("ref: exec python3 -I -S -c pass", lambda: sb.commands.run(PY_START))
            add("trivial bash cell `:`", lambda: sb.run_code(":", language="bash"))
            ctx = sb.create_context()
            add("new context: first cell `1`", lambda c=ctx: sb.run_code("1", context=c))  # type: ignore[misc]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="python")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = measure(args.image, args.rounds)
    floor = statistics.median(rows["floor: commands.run(['true'])"])
    summary: dict[str, dict[str, float | list[float]]] = {
        k: {
            "median": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "x_floor": statistics.median(v) / floor,
            "samples": v,
        }
        for k, v in rows.items()
    }
    if args.json:
        print(json.dumps({"image": args.image, "rows": summary}, indent=1))
        return
    print(f"{'image ' + args.image:44} {'median':>8}  {'min-max':>15}  x floor")
    for k, v in rows.items():
        med = statistics.median(v)
        span = f"{min(v):.3f}-{max(v):.3f}"
        print(f"{k:44} {med:7.3f}s  {span:>15}  {med / floor:6.2f}")
    if "warm: new sandbox's first cell (imports)" in summary:
        warm = statistics.median(rows["warm: new sandbox's first cell (imports)"])
        cold = statistics.median(rows["cold: new context's first cell (imports)"])
        print(f"first cell with imports: warm/cold = {warm / cold:.2f}")


if __name__ == "__main__":
    main()
