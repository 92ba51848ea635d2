"""Fork benchmark: a sandbox with DIRTY MiB of written memory forked into N children that
all answer exec, beside its floor from the same run (one create from a boot template
answering its first exec).

Run: ``.venv/bin/python bench/fork.py [--children 4] [--dirty-mb 100] [--rounds 2]``

Everything runs through mvmd in a private, throw-away ``MVM_HOME`` (``/tmp/mvfk-*``)
linked to the store of the current one (nothing is rebuilt); it is removed at the end,
with any QEMU left for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_store, private_home, raise_on_sigterm, timer
from mvm import paths
from mvm.api import models as M
from mvm.client import Client

OP_TIMEOUT = 120.0
#: The issue's target: forked into 4 children, all answering exec, within 2 s.
TARGET_S = 2.0


def sh(c: Client, name: str, script: str) -> None:
    req = M.ExecRequest(argv=["sh", "-c", script], timeout=OP_TIMEOUT)
    ends = [e for e in c.exec_stream(name, req) if e.type == "exit"]
    if not ends or ends[0].exit_code != 0:
        raise RuntimeError(f"{script!r} in {name} failed: {ends}")


def first_exec(c: Client, name: str) -> None:
    sh(c, name, "true")


def one_round(c: Client, n: int, children: int, dirty_mb: int) -> dict[str, float]:
    src = f"src{n}"
    with timer() as t:
        c.create(M.CreateSandbox(name=src, ttl_seconds=1800))
        first_exec(c, src)
        create_s = t()
    dirty = f"head -c {dirty_mb}M /dev/urandom > /tmp/dirty && sync"
    sh(c, src, dirty)
    with timer() as t:
        out = c.fork(src, f"k{n}", children)
        fork_call = t()
        with ThreadPoolExecutor(children) as pool:
            list(pool.map(lambda k: first_exec(c, k.name), out.children))
        total = t()
    for k in out.children:
        c.down(k.name)
    c.down(src)
    return {
        "create_first_exec": create_s,
        "fork_call": fork_call,
        "fork_all_answer": total,
        "source_pause": out.pause_seconds,
        **{f"stage_{k}": v for k, v in out.stages.items()},
    }


ROWS = [
    ("create_first_exec", "floor: create (template restore) + first exec"),
    ("source_pause", "source paused for the snapshot"),
    ("stage_loader", "  mvmd: loader QEMU started (its RAM: the shared file)"),
    ("stage_snapshot", "  mvmd: source streamed (pre-copy) into the loader's RAM"),
    ("stage_image", "  (before: the stream file loaded once into shared RAM)"),
    ("stage_children", "  mvmd: children restored copy-on-write, handshaken"),
    ("fork_call", "fork call (snapshot + every child restored)"),
    ("fork_all_answer", "fork until every child answered exec"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--dirty-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    raise_on_sigterm()
    store = paths.home() if "MVM_HOME" in os.environ else default_store()
    samples: dict[str, list[float]] = {k: [] for k, _ in ROWS}
    with private_home(store, prefix="mvfk-"), Client() as c:
        for n in range(args.rounds):
            for k, v in one_round(c, n, args.children, args.dirty_mb).items():
                samples.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    if args.json:
        print(json.dumps({"args": vars(args), "samples": samples, "median": med}))
        return
    t = Table(title=f"fork: {args.dirty_mb} MiB dirtied, {args.children} children (median)")
    t.add_column("what")
    t.add_column("seconds", justify="right")
    t.add_column("samples", justify="right")
    for k, label in ROWS:
        if not samples.get(k):
            continue
        t.add_row(label, f"{med[k]:.3f}", " ".join(f"{x:.3f}" for x in samples[k]))
    t.add_row(
        "ratio: fork until all answer / floor",
        f"{med['fork_all_answer'] / med['create_first_exec']:.2f}x",
        "",
    )
    t.add_row(
        "ratio: fork until all answer / target 2 s",
        f"{med['fork_all_answer'] / TARGET_S:.2f}x",
        "",
    )
    Console().print(t)


if __name__ == "__main__":
    main()
