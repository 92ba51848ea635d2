"""Browser sandbox benchmark: create → CDP answering from the warm template vs a cold Chromium.

Run: ``.venv/bin/python bench/browser.py [--rounds N] [--cold N] [--idle N] [--json]``

Side by side in one run, against a private throw-away ``MVM_HOME`` linked to the store
(``MVM_HOME`` if set, else the default one; the browser image is built there if missing):

- **warm**: ``mvm.BrowserSandbox.create(allow=[...])`` (a restore of the warm template,
  Chromium already running) until ``cdp_url`` answered (``/json/version`` through the
  port forward), then ``kill()``. An untimed first round makes the template if needed.
- **cold**: ``MicroVM.boot(fast=False)`` of the same image (a cold boot, then the image's
  warm recipe: Chromium started, probed until its DevTools endpoint answers in the guest).
- **PSS** of each QEMU of ``--idle`` warm browser sandboxes left idle for 10 s
  (``/proc/PID/smaps_rollup``): the memory one more idle browser sandbox costs.

Goal (issue 13): warm ≤ 2 s, and ≥ 20× faster than cold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Row,
    add_sample_row,
    default_store,
    finish_facts,
    host_facts,
    host_table,
    private_home,
    raise_on_sigterm,
    report_console,
    samples_table,
)
from mvm.images.store import ImageStore
from mvm.vm import MicroVM, VMSpec
from mvm.vmm.qemu import find_qemu, qemu_binary

GOAL_WARM_S, GOAL_RATIO = 2.0, 20.0
ALLOW = ["example.org"]
IDLE_SECONDS = 10.0


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for {pid}")


def warm_once() -> float:
    import mvm

    t0 = time.perf_counter()
    sb = mvm.BrowserSandbox.create(allow=ALLOW)
    try:
        assert sb.cdp_url.startswith("ws://127.0.0.1:")
        return time.perf_counter() - t0
    finally:
        sb.kill()


def cold_once(store: ImageStore) -> tuple[float, float]:
    """(create → Chromium answering, of which the VM's cold boot)."""
    from mvm.sdk.browser import DEFAULT_MEMORY_MB

    img = store.resolve("browser")
    spec = VMSpec(img, memory_mb=DEFAULT_MEMORY_MB, overlay_size=f"{DEFAULT_MEMORY_MB // 2}m")

    async def go() -> tuple[float, float]:
        t0 = time.perf_counter()
        vm = await MicroVM.boot(spec, store=store, fast=False)
        try:
            return time.perf_counter() - t0, vm.boot_seconds
        finally:
            await vm.destroy()

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="warm creates (default 3)")
    ap.add_argument("--cold", type=int, default=1, help="cold starts (default 1; ~1-2 min each)")
    ap.add_argument("--idle", type=int, default=2, help="idle sandboxes for PSS (default 2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    raise_on_sigterm()
    source = Path(os.environ["MVM_HOME"]) if os.environ.get("MVM_HOME") else default_store()
    store = ImageStore(source)
    img = store.ensure("browser")
    rows = {
        "warm": Row("warm", "warm template: create → CDP answering (host)", "s"),
        "cold": Row("cold", "cold: boot + Chromium start → CDP answering (guest)", "s"),
        "cold_boot": Row("cold_boot", "  of which the VM's cold boot", "s"),
        "pss": Row("pss", "PSS per idle warm browser sandbox", "MiB"),
    }
    t_start = time.time()
    facts = host_facts(img, find_qemu(qemu_binary()))
    with private_home(source, prefix="mvbb-"):
        import mvm

        warm_once()  # untimed: makes the warm template if this shape has none yet
        for _ in range(args.rounds):
            rows["warm"].samples.append(warm_once())
        for _ in range(args.cold):
            total, boot = cold_once(store)
            rows["cold"].samples.append(total)
            rows["cold_boot"].samples.append(boot)
        idle = [mvm.BrowserSandbox.create(allow=ALLOW) for _ in range(args.idle)]
        try:
            for sb in idle:
                assert sb.cdp_url
            time.sleep(IDLE_SECONDS)  # a measurement interval, not synchronisation
            for sb in idle:
                pid = sb.info().pid
                assert pid is not None
                rows["pss"].samples.append(pss_mib(pid))
        finally:
            for sb in idle:
                sb.kill()
    finish_facts(facts, t_start)
    warm, cold = rows["warm"].median, rows["cold"].median
    verdict = {
        "warm_s": warm,
        "cold_s": cold,
        "cold_over_warm": cold / warm if warm else None,
        "goal_warm_s": GOAL_WARM_S,
        "goal_ratio": GOAL_RATIO,
        "warm_goal_met": warm <= GOAL_WARM_S,
        "ratio_goal_met": bool(warm) and cold / warm >= GOAL_RATIO,
    }
    if args.json:
        print(
            json.dumps(
                {"host": facts, "rows": {k: r.to_json() for k, r in rows.items()}, **verdict},
                indent=2,
            )
        )
        return
    con = report_console()
    con.print(host_table(facts, [k for k in ("cpus", "accel", "qemu") if k in facts]))
    t = samples_table("browser sandbox start-up and memory")
    for i, row in enumerate(rows.values(), 1):
        add_sample_row(t, str(i), row)
    con.print(t)
    con.print(
        f"cold / warm = {verdict['cold_over_warm']:.1f}x (goal ≥ {GOAL_RATIO:g}x: "
        f"{'met' if verdict['ratio_goal_met'] else 'NOT met'}); warm {warm:.2f} s "
        f"(goal ≤ {GOAL_WARM_S:g} s: {'met' if verdict['warm_goal_met'] else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
