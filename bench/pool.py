"""Pool benchmark: SDK create -> first exec answered, with mvmd's pool of waiting VMs and
without it, beside a bare QEMU cold boot of the same kernel and image (the floor the
issue's ratio is against), and N concurrent creates (creates per core-second).

Run: ``.venv/bin/python bench/pool.py [--rounds 3] [--concurrent 8]``

Each variant runs against its own private, throw-away ``MVM_HOME`` (``/tmp/mvpl-*``)
linked to the current store (MVM_POOL_SIZE=2 with MVM_POOL_WARM=1, then 2, then 0); the homes are removed at the end
with any QEMU left for them. Between sequential creates the pool is given time to
refill (bounded), as it would between a user's creates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mvm
from common import default_store, private_home, raise_on_sigterm
from mvm import paths
from mvm.client import Client
from mvm.images.store import ImageStore
from mvm.sdk import mode as sdk_mode
from mvm.vm import VMSpec
from start import bare_boot

REFILL_WAIT = 120.0


async def create_first_exec(name: str) -> float:
    t0 = time.perf_counter()
    sb = await mvm.AsyncSandbox.create("python", name=name, ttl="10m")
    r = await sb.commands.run(["true"])
    took = time.perf_counter() - t0
    assert r.exit_code == 0
    await sb.stop()
    return took


def wait_pool(size: int) -> None:
    deadline = time.monotonic() + REFILL_WAIT
    with Client() as c:
        while time.monotonic() < deadline:
            if c.status().pool.get("idle", 0) >= size:
                return
            time.sleep(0.2)


def variant(
    store: Path, pool: int, rounds: int, concurrent: int, warm: bool = False
) -> dict[str, float]:
    os.environ["MVM_POOL_SIZE"] = str(pool)
    os.environ["MVM_POOL_WARM"] = "1" if warm else "0"
    sdk_mode._backend = None  # the SDK's live backend holds the previous home's socket
    with private_home(store, prefix="mvpl-"):
        asyncio.run(create_first_exec("warm"))  # makes the template/shape hot
        seq = []
        for n in range(rounds):
            if pool:
                wait_pool(min(pool, 1))
            seq.append(asyncio.run(create_first_exec(f"s{n}")))
        if pool:
            wait_pool(pool)

        async def burst() -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(create_first_exec(f"c{i}") for i in range(concurrent)))
            return time.perf_counter() - t0

        wall = asyncio.run(burst())
    return {
        "seq": statistics.median(seq),
        "burst_wall": wall,
        "per_core_s": concurrent / (wall * (os.cpu_count() or 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=8)
    args = ap.parse_args()
    raise_on_sigterm()
    store = paths.home() if "MVM_HOME" in os.environ else default_store()
    spec = VMSpec(ImageStore(store).ensure("python"))
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="mvpb-") as root:
        bare = statistics.median(
            asyncio.run(bare_boot(spec, ImageStore(store), Path(root), n))
            for n in range(args.rounds)
        )
    warm = variant(store, 2, args.rounds, args.concurrent, warm=True)
    on = variant(store, 2, args.rounds, args.concurrent)
    off = variant(store, 0, args.rounds, args.concurrent)
    t = Table(title=f"create -> first exec (median of {args.rounds}); {args.concurrent} at once")
    cols = (
        "what",
        "seconds",
        "bare cold boot / this (target >= 25x)",
        "creates per core-second (target >= 5)",
    )
    for col in cols:
        t.add_column(col, justify="right" if col != "what" else "left")
    t.add_row("bare QEMU cold boot (floor)", f"{bare:.3f}", "1.0x", "")
    variants = (
        ("SDK create+exec, pre-warmed pool", warm),
        ("SDK create+exec, pool", on),
        ("SDK create+exec, no pool", off),
    )
    for label, v in variants:
        t.add_row(label, f"{v['seq']:.3f}", f"{bare / v['seq']:.1f}x", "")
        t.add_row(
            f"  {args.concurrent} concurrent, wall",
            f"{v['burst_wall']:.3f}",
            "",
            f"{v['per_core_s']:.2f}",
        )
    Console().print(t)


if __name__ == "__main__":
    main()
