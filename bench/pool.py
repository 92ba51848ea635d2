"""Pool benchmark: SDK create -> first exec answered, with mvmd's pool of waiting VMs and
without it, beside a bare QEMU cold boot of the same kernel and image (the floor the
issue's ratio is against), and N concurrent creates (creates per core-second).

Run: ``.venv/bin/python bench/pool.py [--rounds 3] [--concurrent 8,32] [--pool 2[,8]]
[--pool-max-mb 2048] [--unwarmed] [--no-off] [--memory 512]``

Each variant runs against its own private, throw-away ``MVM_HOME`` (``/tmp/mvpl-*``)
linked to the current store (one per ``--pool`` size: MVM_POOL_SIZE=N with MVM_POOL_WARM=1
and MVM_POOL_MAX_MB from ``--pool-max-mb``; with ``--unwarmed`` also MVM_POOL_WARM=0;
then MVM_POOL_SIZE=0 unless ``--no-off``); the homes are removed at the end with any
QEMU left for them. Between sequential creates the pool gets one VM back, and before each
burst it is refilled completely: the bench waits (bounded) until ``GET /status`` shows
as many idle VMs as the pool can hold (``MVM_POOL_SIZE``, fewer if ``MVM_POOL_MAX_MB``
caps it; the table header says which), and stops if it never gets there. A burst of N
runs on an executor of N threads: the SDK's async API runs each call with
``asyncio.to_thread``, whose default executor has only ``cpu_count + 4`` threads (6
here), which would measure that cap rather than mvmd. A burst's wall is from the first
create to the last first exec answered; the sandboxes are stopped after it, outside the
timing (the stops' wall is printed beside it).

In the pool-off home, mvmd's own share of a create is also measured by stage
(``createstages``: the service driven in-process with timing wrappers) and printed
beside the SDK's create -> first exec and the in-process restore + exec floor; what the
SDK path costs beyond the in-process service is the HTTP hops, the client and the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import createstages
import mvm
from common import default_store, private_home, raise_on_sigterm
from mvm import paths
from mvm.client import Client
from mvm.images.store import ImageStore
from mvm.sdk import mode as sdk_mode
from mvm.vm import VMSpec
from start import bare_boot

REFILL_WAIT = 300.0


MEMORY_MB = 512
POOL_MAX_MB = 2048


async def create_first_exec(name: str) -> float:
    sb, took = await create_only(name)
    await sb.stop()
    return took


async def create_only(name: str) -> tuple[mvm.AsyncSandbox, float]:
    """Create + first exec answered (the sandbox is left running)."""
    t0 = time.perf_counter()
    res = mvm.Resources(memory_mb=MEMORY_MB)
    sb = await mvm.AsyncSandbox.create("python", name=name, ttl="10m", resources=res)
    r = await sb.commands.run(["true"])
    took = time.perf_counter() - t0
    assert r.exit_code == 0
    return sb, took


def pool_holds(size: int) -> int:
    """How many idle VMs of this bench's shape a pool of ``size`` can hold."""
    return min(size, POOL_MAX_MB // MEMORY_MB)


def wait_pool(size: int) -> None:
    """Until ``size`` VMs wait (pre-warmed ones count once warm); fails if never."""
    deadline = time.monotonic() + REFILL_WAIT
    with Client() as c:
        while time.monotonic() < deadline:
            if c.status().pool.get("idle", 0) >= size:
                return
            time.sleep(0.2)
        raise SystemExit(
            f"the pool did not refill to {size} in {REFILL_WAIT:.0f} s: {c.status().pool}"
        )


def variant(
    store: Path, pool: int, rounds: int, concurrent: list[int], warm: bool = False
) -> dict[str, Any]:
    os.environ["MVM_POOL_SIZE"] = str(pool)
    os.environ["MVM_POOL_WARM"] = "1" if warm else "0"
    os.environ["MVM_POOL_MAX_MB"] = str(POOL_MAX_MB)
    sdk_mode._backend = None  # the SDK's live backend holds the previous home's socket
    with private_home(store, prefix="mvpl-"):
        asyncio.run(create_first_exec("warm"))  # makes the template/shape hot
        out: dict[str, Any] = {"bursts": {}}
        if not pool:  # SDK creates paired, round by round, with the in-process stages
            med, floor = asyncio.run(createstages.measure(rounds, create_first_exec_n))
            out["stages"] = (med, floor)
            out["seq"] = med["also"]
        else:
            seq = []
            for n in range(rounds):
                wait_pool(min(pool, 1))
                seq.append(asyncio.run(create_first_exec(f"s{n}")))
            out["seq"] = statistics.median(seq)
        for n in concurrent:
            if pool:
                wait_pool(pool_holds(pool))
            wall, stops = asyncio.run(burst(n))
            out["bursts"][n] = (wall, n / (wall * (os.cpu_count() or 1)), stops)
    return out


async def create_first_exec_n(n: int) -> float:
    return await create_first_exec(f"s{n}")


async def burst(n: int) -> tuple[float, float]:
    """``n`` SDK creates + first exec at once, each with its own thread (see above): the
    wall until the last first exec answered, then the wall of stopping them all."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
        asyncio.get_running_loop().set_default_executor(ex)
        t0 = time.perf_counter()
        got = await asyncio.gather(*(create_only(f"c{n}-{i}") for i in range(n)))
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        await asyncio.gather(*(sb.stop() for sb, _ in got))
        return wall, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrent", default="8,32", help="burst sizes, comma-separated")
    ap.add_argument("--unwarmed", action="store_true", help="also a pool without pre-warming")
    ap.add_argument("--memory", type=int, default=MEMORY_MB, help="MiB per sandbox")
    ap.add_argument("--pool", default="2", help="pool sizes (MVM_POOL_SIZE), comma-separated")
    ap.add_argument(
        "--pool-max-mb", type=int, default=POOL_MAX_MB, help="MVM_POOL_MAX_MB for the pools"
    )
    ap.add_argument("--no-off", action="store_true", help="skip the no-pool variant and stages")
    args = ap.parse_args()
    globals()["MEMORY_MB"] = args.memory
    globals()["POOL_MAX_MB"] = args.pool_max_mb
    pools = [int(x) for x in args.pool.split(",") if x]
    bursts = [int(x) for x in args.concurrent.split(",") if x]
    raise_on_sigterm()
    store = paths.home() if "MVM_HOME" in os.environ else default_store()
    spec = VMSpec(ImageStore(store).ensure("python"))
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="mvpb-") as root:
        bare = statistics.median(
            asyncio.run(bare_boot(spec, ImageStore(store), Path(root), n))
            for n in range(args.rounds)
        )
    load0 = os.getloadavg()[0]
    variants = []
    for size in pools:
        label = f"SDK create+exec, pre-warmed pool of {size} (holds {pool_holds(size)})"
        variants.append((label, variant(store, size, args.rounds, bursts, warm=True)))
        if args.unwarmed:
            label = f"SDK create+exec, pool of {size}, not warmed"
            variants.append((label, variant(store, size, args.rounds, bursts)))
    off = None if args.no_off else variant(store, 0, args.rounds, bursts)
    if off is not None:
        variants.append(("SDK create+exec, no pool", off))
    t = Table(
        title=f"create -> first exec (median of {args.rounds}), {args.memory} MiB; "
        f"{args.concurrent} at once; MVM_POOL_SIZE {args.pool}, MVM_POOL_MAX_MB "
        f"{args.pool_max_mb}, pre-warmed; {os.cpu_count()} cores; "
        f"load {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    cols = (
        "what",
        "seconds",
        "bare cold boot / this (target >= 25x)",
        "creates per core-second (target >= 5)",
        "then stopping them all, wall",
    )
    for col in cols:
        t.add_column(col, justify="right" if col != "what" else "left")
    t.add_row("bare QEMU cold boot (floor)", f"{bare:.3f}", "1.0x", "", "")
    for label, v in variants:
        t.add_row(label, f"{v['seq']:.3f}", f"{bare / v['seq']:.1f}x", "", "")
        for n, (wall, per_core, stops) in v["bursts"].items():
            t.add_row(
                f"  {n} concurrent, wall to the last first exec",
                f"{wall:.3f}",
                "",
                f"{per_core:.2f} ({per_core / 5:.2f}x the target)",
                f"{stops:.3f}",
            )
    con = Console(width=200)
    con.print(t)
    if off is None:
        return
    med, floor = off["stages"]
    s = Table(title=f"mvmd's own share of a create, by stage (no pool, median of {args.rounds})")
    for col in ("what", "seconds", "/ in-process restore + exec (target: SDK <= 1.3x)"):
        s.add_column(col, justify="left" if col == "what" else "right")
    s.add_row(
        "SDK create + first exec through mvmd",
        f"{off['seq']:.3f}",
        f"{off['seq'] / floor['total']:.2f}x",
    )
    rest = med["beyond"]  # per round, then the median
    s.add_row(
        "  beyond the in-process service: HTTP, client, SDK",
        f"{rest:.3f}",
        f"{rest / floor['total']:.2f}x",
    )
    for row in createstages.rows(med, floor):
        s.add_row(*row)
    con.print(s)


if __name__ == "__main__":
    main()
