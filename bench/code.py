"""run_code costs on one sandbox: a new context's first cell (interpreter start included),
a trivial cell's round trip, a plain ``commands.run(["true"])`` for comparison, and, with
``--image python-data``, a first cell importing numpy and pandas.

    .venv/bin/python bench/code.py [--image python] [--rounds 5] [--json]

Uses the usual MVM_HOME (mvmd is started if needed). Medians with min-max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import mvm


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="python")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    with mvm.Sandbox.create(args.image, resources=mvm.resources(memory_mb=1024)) as sb:
        sb.commands.run(["true"])  # warm the exec path once
        for _ in range(args.rounds):
            ctx = sb.create_context()
            rows.setdefault("new context: first cell `1`", []).append(
                timed(lambda c=ctx: sb.run_code("1", context=c))  # type: ignore[misc]
            )
            rows.setdefault("trivial cell `1` (warm context)", []).append(
                timed(lambda c=ctx: sb.run_code("1", context=c))  # type: ignore[misc]
            )
            rows.setdefault("commands.run(['true'])", []).append(
                timed(lambda: sb.commands.run(["true"]))
            )
            if args.image == "python-data":
                data = sb.create_context()
                rows.setdefault("new context: import numpy, pandas", []).append(
                    timed(lambda c=data: sb.run_code("import numpy, pandas", context=c))  # type: ignore[misc]
                )
    summary = {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
        for k, v in rows.items()
    }
    if args.json:
        print(json.dumps({"image": args.image, "rows": summary}, indent=1))
        return
    for k, s in summary.items():
        print(f"{k:40} {s['median']:7.3f} s  ({s['min']:.3f}-{s['max']:.3f})")


if __name__ == "__main__":
    main()
