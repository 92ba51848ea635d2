"""Browser sandbox benchmark: warm vs cold start, navigation, screenshots, idle memory.

Run: ``.venv/bin/python bench/browser.py [--rounds N] [--cold N] [--idle N] [--json]``
(root: the pages come from a stand-in web server in a private network namespace).

Side by side in one run, against a private throw-away ``MVM_HOME`` linked to the store
(``MVM_HOME`` if set, else the default one; the browser image is built there if missing),
each figure beside its floor from the same run:

- **warm start**: ``mvm.BrowserSandbox.create(allow=[...])`` (a restore of the warm
  template, Chromium already running) until ``cdp_url`` answered (``/json/version``
  through the port forward); floor: ``mvm.Sandbox.create`` of the python image, same
  memory, until its first exec answered. Untimed first rounds before both.
- **cold start**: ``MicroVM.boot(fast=False)`` of the browser image (a cold boot, then the
  image's warm recipe: Chromium started, probed until DevTools answers in the guest). It
  runs first; then the warm template is made (in-process, untimed) if missing.
- **navigation**: Playwright (``connect_over_cdp``) ``page.goto`` of a page served through
  the sandbox's egress proxy (a fresh URL each round); floor: ``goto("about:blank")``.
- **screenshot**: Playwright ``page.screenshot()`` and the SDK's ``sb.screenshot(url)``
  (a fresh tab in the guest, loaded, captured, out through an audited exec); floor: an
  exec of ``true`` in the same sandbox.
- **PSS** of each QEMU of ``--idle`` warm browser sandboxes, idle for 10 s
  (``/proc/PID/smaps_rollup``); floor: as many idle python sandboxes of the same memory.

Goal (issue 13): warm ≤ 2 s, and ≥ 20× faster than cold.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests.integration helpers
import msgspec

from common import (
    Row,
    add_sample_row,
    default_store,
    finish_facts,
    host_facts,
    host_table,
    patient,
    plain_once,
    private_home,
    raise_on_sigterm,
    report_console,
    samples_table,
)
from mvm.images.store import ImageStore
from mvm.vm import MicroVM, VMSpec
from mvm.vmm.qemu import find_qemu, qemu_binary

GOAL_WARM_S, GOAL_RATIO = 2.0, 20.0
#: The stand-in web server (198.18.0.0/15: benchmarking addresses, never a real host).
NS_ADDR, HOST_ADDR, PORT = "198.18.77.2", "198.18.77.1", 8080
SITE = f"bench.test:{PORT}"
ALLOW = [SITE]
IDLE_SECONDS = 10.0
#: The cold start's probe: DevTools answers in the guest (the preset's probe also waits
#: for the guest to go idle before the template is snapshotted).
CDP_PROBE = [
    "python3",
    "-c",
    "import urllib.request as u; u.build_opener(u.ProxyHandler({}))"
    ".open('http://127.0.0.1:9222/json/version', timeout=5).read()",
]
PAGE = "<!doctype html><html><head><title>bench</title></head><body>" + "<p>mvm</p>" * 200


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for {pid}")


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def warm_once() -> tuple[float, float]:
    """(create → CDP answering, of which ``create`` itself: restore, agent, egress proxy)."""
    import mvm

    t0 = time.perf_counter()
    sb = mvm.BrowserSandbox.create(allow=ALLOW)
    t1 = time.perf_counter()
    try:
        assert sb.cdp_url.startswith("ws://127.0.0.1:")
        return time.perf_counter() - t0, t1 - t0
    finally:
        sb.kill()


def plain_create(memory_mb: int) -> Any:
    import mvm

    return mvm.Sandbox.create("python", resources=mvm.resources(memory_mb=memory_mb))


def cold_once(store: ImageStore, memory_mb: int) -> tuple[float, float]:
    """(create → Chromium answering, of which the VM's cold boot). The recipe's probe is
    cut to its first half (DevTools answers), without the wait for the guest to settle
    that the template gets: the cold figure is Chromium's start, not the settling."""
    img = patient(store.resolve("browser"))
    w = img.manifest.warm
    assert w is not None
    warm = msgspec.structs.replace(w, probe=CDP_PROBE)
    img = msgspec.structs.replace(img, manifest=msgspec.structs.replace(img.manifest, warm=warm))
    spec = VMSpec(img, memory_mb=memory_mb, overlay_size=f"{memory_mb // 2}m")

    async def go() -> tuple[float, float]:
        t0 = time.perf_counter()
        vm = await MicroVM.boot(spec, store=store, fast=False)
        try:
            return time.perf_counter() - t0, vm.boot_seconds
        finally:
            await vm.destroy()

    return asyncio.run(go())


def make_template(store: ImageStore, memory_mb: int) -> None:
    """Make the warm template of the shape ``create(allow=...)`` uses, in-process (no
    client timeout: under heavy load a cold Chromium start can outlast mvmd's answer)."""
    spec = VMSpec(
        store.resolve("browser"),
        cpus=1,
        memory_mb=memory_mb,
        overlay_size=f"{memory_mb // 2}m",
        network=True,
    )

    async def go() -> None:
        vm = await MicroVM.boot(spec, store=store, fast=True)
        await vm.destroy()

    asyncio.run(go())


def page_rounds(rows: dict[str, Row], rounds: int) -> None:
    """Navigation and screenshots on one warm browser sandbox (rounds interleaved)."""
    from playwright.sync_api import sync_playwright

    import mvm

    with mvm.BrowserSandbox.create(allow=ALLOW) as sb, sync_playwright() as pw:
        browser = pw.chromium.connect_over_cdp(sb.cdp_url, timeout=300_000)
        try:
            page = browser.contexts[0].new_page()
            page.set_default_timeout(300_000)
            page.goto(f"http://{SITE}/")  # untimed: the first load warms the renderer
            sb.screenshot()
            for i in range(rounds):
                nav, url = f"http://{SITE}/?r={i}", f"http://{SITE}/?t={i}"
                rows["nav"].samples.append(timed(functools.partial(page.goto, nav)))
                rows["blank"].samples.append(timed(functools.partial(page.goto, "about:blank")))
                page.goto(f"http://{SITE}/?s={i}")
                rows["pw_shot"].samples.append(timed(page.screenshot))
                rows["sdk_shot"].samples.append(timed(functools.partial(sb.screenshot, url)))
                rows["exec"].samples.append(timed(functools.partial(sb.commands.run, ["true"])))
        finally:
            browser.close()


def pss_rounds(rows: dict[str, Row], idle: int, memory_mb: int) -> None:
    import mvm

    kinds = (("pss", lambda: mvm.BrowserSandbox.create(allow=ALLOW)), ("pss_plain", None))
    for key, make in kinds:
        sbs: list[Any] = []
        try:
            for _ in range(idle):
                sbs.append(make() if make else plain_create(memory_mb))
            for sb in sbs:  # each answering: Chromium's endpoint, or the agent
                _ = sb.cdp_url if key == "pss" else sb.commands.run(["true"])
            time.sleep(IDLE_SECONDS)  # a measurement interval, not synchronisation
            for sb in sbs:
                pid = sb.info().pid
                assert pid is not None
                rows[key].samples.append(pss_mib(pid))
        finally:
            for sb in sbs:
                sb.kill()


def make_rows() -> dict[str, Row]:
    rows = [
        Row("warm", "warm template: create → CDP answering (host)", "s", group="start"),
        Row("warm_create", "  of which create() (restore, agent, proxy)", "s", group="start"),
        Row("plain", "  floor: python sandbox create → first exec", "s", group="start"),
        Row("cold", "cold: boot + Chromium start → CDP answering", "s", group="start"),
        Row("cold_boot", "  of which the VM's cold boot", "s", group="start"),
        Row("nav", "Playwright goto, page through the egress proxy", "ms", group="page"),
        Row("blank", "  floor: goto about:blank", "ms", group="page"),
        Row("pw_shot", "Playwright page.screenshot()", "ms", group="page"),
        Row("sdk_shot", "SDK screenshot(url) (tab, load, PNG via exec)", "ms", group="page"),
        Row("exec", "  floor: exec true in the same sandbox", "ms", group="page"),
        Row("pss", "PSS per idle warm browser sandbox", "MiB", group="memory"),
        Row(
            "pss_plain", "  floor: PSS per idle python sandbox, same memory", "MiB", group="memory"
        ),
    ]
    return {r.key: r for r in rows}


def to_ms(rows: dict[str, Row]) -> None:
    for r in rows.values():
        if r.unit == "ms":
            r.samples = [s * 1000 for s in r.samples]


def main() -> None:
    from tests.integration.standin_internet import serve

    from mvm.sdk.browser import DEFAULT_MEMORY_MB

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="warm creates, page rounds (3)")
    ap.add_argument("--cold", type=int, default=1, help="cold starts (default 1; ~1-2 min each)")
    ap.add_argument("--idle", type=int, default=2, help="idle sandboxes of each kind for PSS")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    raise_on_sigterm()
    source = Path(os.environ["MVM_HOME"]) if os.environ.get("MVM_HOME") else default_store()
    store = ImageStore(source)
    img = store.ensure("browser")
    store.ensure("python")
    rows = make_rows()
    t_start = time.monotonic()
    facts = host_facts(img, find_qemu(qemu_binary()))
    mem = DEFAULT_MEMORY_MB
    with tempfile.TemporaryDirectory(prefix="mvbb-www-") as www:
        Path(www, "index.html").write_text(PAGE)
        with serve(Path(www), NS_ADDR, HOST_ADDR, PORT) as addr:
            os.environ["MVM_EGRESS_RESOLVE"] = f"bench.test={addr}"  # mvmd inherits it
            with private_home(source, prefix="mvbb-"):
                for _ in range(args.cold):
                    total, boot = cold_once(store, mem)
                    rows["cold"].samples.append(total)
                    rows["cold_boot"].samples.append(boot)
                make_template(store, mem)  # untimed: the warm template of this shape
                warm_once()  # untimed: the first restore of a new template pays more
                plain_once(mem)  # untimed: makes the floor's template if missing
                for _ in range(args.rounds):
                    total, create = warm_once()
                    rows["warm"].samples.append(total)
                    rows["warm_create"].samples.append(create)
                    rows["plain"].samples.append(plain_once(mem))
                page_rounds(rows, args.rounds)
                pss_rounds(rows, args.idle, mem)
    finish_facts(facts, t_start)
    to_ms(rows)
    report(rows, facts, args.json)


def report(rows: dict[str, Row], facts: dict[str, Any], as_json: bool) -> None:
    warm, cold = rows["warm"].median, rows["cold"].median
    verdict = {
        "warm_s": warm,
        "cold_s": cold,
        "cold_over_warm": cold / warm if warm else None,
        "warm_over_floor": warm / rows["plain"].median,
        "pss_over_floor": rows["pss"].median / rows["pss_plain"].median,
        "goal_warm_s": GOAL_WARM_S,
        "goal_ratio": GOAL_RATIO,
        "warm_goal_met": warm <= GOAL_WARM_S,
        "ratio_goal_met": bool(warm) and cold / warm >= GOAL_RATIO,
    }
    if as_json:
        doc = {"host": facts, "rows": {k: r.to_json() for k, r in rows.items()}, **verdict}
        print(json.dumps(doc, indent=2))
        return
    con = report_console()
    con.print(host_table(facts, [k for k in ("cpus", "accel", "qemu", "image") if k in facts]))
    t = samples_table("browser sandbox: start-up, pages, memory (floors indented)")
    for i, row in enumerate(rows.values(), 1):
        add_sample_row(t, str(i), row, ms_digits=0)
    con.print(t)
    con.print(
        f"cold / warm = {verdict['cold_over_warm']:.1f}x (goal ≥ {GOAL_RATIO:g}x: "
        f"{'met' if verdict['ratio_goal_met'] else 'NOT met'}); warm {warm:.2f} s "
        f"= {verdict['warm_over_floor']:.2f}x its floor (goal ≤ {GOAL_WARM_S:g} s: "
        f"{'met' if verdict['warm_goal_met'] else 'NOT met'}, "
        f"{warm / GOAL_WARM_S:.2f} of it); PSS {verdict['pss_over_floor']:.2f}x its floor"
    )


if __name__ == "__main__":
    main()
