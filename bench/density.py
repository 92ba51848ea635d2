"""Density benchmark: how many idle sandboxes this host holds, and what each one costs.

Run: ``.venv/bin/python bench/density.py [--count N] [--memory MB] [--settle S] [--window S] [--json]``

Starts N idle sandboxes through mvmd (``Client.create``, template restore, as ``mvmctl up``
does) in a private, throw-away ``MVM_HOME`` whose image store links to the default one,
lets them settle, then measures over a window:

- PSS of each sandbox's QEMU (``/proc/PID/smaps_rollup``): shared clean template pages
  are split between the clones, so the sum of PSS is what the set really costs;
  the goal is PSS per sandbox / guest RAM <= 0.12;
- idle host CPU per sandbox (utime + stime of each QEMU over the window), goal < 0.5 %
  of a core;
- mvmd's RSS;
- how many such idle sandboxes this host's available memory would hold.

Everything it started is taken down at the end (also on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rich.table import Table

from common import (
    Row,
    daemon_pid,
    default_store,
    err,
    private_home,
    raise_on_sigterm,
    report_console,
    timer,
)
from mvm import client as mvmclient
from mvm.api import models as M

IMAGE = "python"
#: Goals from the issue: PSS per sandbox over guest RAM, idle CPU per sandbox (% of a core).
PSS_GOAL = 0.12
CPU_GOAL = 0.5
CREATE_TIMEOUT = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (clock ticks; 0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def measure(count: int, memory_mb: int, settle: float, window: float) -> dict[str, Any]:
    results: dict[str, Any] = {"count": count, "memory_mb": memory_mb}
    create = Row("create", "create (template restore) -> running", "s")
    with (
        private_home(default_store(), prefix="mvd-") as home,
        mvmclient.Client(timeout=CREATE_TIMEOUT) as c,
    ):
        pids: dict[str, int] = {}
        # One untimed create first: makes the boot template of this shape if missing.
        warm = c.create(M.CreateSandbox(name="warm", image=IMAGE, memory_mb=memory_mb))
        c.down(warm.name)
        for i in range(count):
            with timer() as t:
                info = c.create(M.CreateSandbox(name=f"d{i}", image=IMAGE, memory_mb=memory_mb))
            create.samples.append(t())
            if info.pid is None:
                raise SystemExit(f"sandbox d{i} has no QEMU pid: {info.state} {info.reason}")
            pids[info.name] = info.pid
            err.print(f"  started {info.name} (pid {info.pid}) in {t():.2f} s")
        err.print(f"settling {settle:.0f} s")
        time.sleep(settle)
        t0 = {n: cpu_ticks(p) for n, p in pids.items()}
        w0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - w0
        cpu_pct = [100.0 * (cpu_ticks(p) - t0[n]) / CLK_TCK / elapsed for n, p in pids.items()]
        pss = [pss_kib(p) / 1024 for p in pids.values()]
        rss = [rss_kib(p) / 1024 for p in pids.values()]
        dpid = daemon_pid(home)
        mvmd_rss = rss_kib(dpid) / 1024 if dpid else float("nan")
        avail = mem_available_kib() / 1024
        per_box = statistics.median(pss)
        results.update(
            {
                "create_s": create.to_json(),
                "pss_mib": {"median": per_box, "max": max(pss), "sum": sum(pss)},
                "rss_mib": {"median": statistics.median(rss), "max": max(rss)},
                "pss_over_guest_ram": per_box / memory_mb,
                "idle_cpu_pct_of_core": {
                    "median": statistics.median(cpu_pct),
                    "max": max(cpu_pct),
                    "sum": sum(cpu_pct),
                },
                "mvmd_rss_mib": mvmd_rss,
                "mem_available_mib_with_set_running": avail,
                "projected_idle_sandboxes": int((avail + sum(pss)) / per_box) if per_box else 0,
                "loadavg": list(os.getloadavg()),
                "window_s": elapsed,
            }
        )
    return results


def render(r: dict[str, Any]) -> None:
    con = report_console()
    t = Table(
        title=f"density: {r['count']} idle sandboxes of {r['memory_mb']} MiB", title_justify="left"
    )
    t.add_column("measurement")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    t.add_column("value / goal", justify="right")
    ratio = r["pss_over_guest_ram"]
    t.add_row(
        "PSS per sandbox (median / max)",
        f"{r['pss_mib']['median']:.1f} / {r['pss_mib']['max']:.1f} MiB",
        "",
        "",
    )
    t.add_row(
        "PSS per sandbox / guest RAM", f"{ratio:.3f}", f"<= {PSS_GOAL}", f"{ratio / PSS_GOAL:.2f}"
    )
    cpu = r["idle_cpu_pct_of_core"]
    t.add_row(
        "idle host CPU per sandbox (median / max)",
        f"{cpu['median']:.2f} / {cpu['max']:.2f} % of a core",
        f"< {CPU_GOAL} %",
        f"{cpu['median'] / CPU_GOAL:.2f}",
    )
    t.add_row("RSS per QEMU (median)", f"{r['rss_mib']['median']:.1f} MiB", "", "")
    t.add_row("mvmd RSS", f"{r['mvmd_rss_mib']:.1f} MiB", "", "")
    t.add_row("create -> running (median)", f"{r['create_s']['median']:.3f} s", "", "")
    t.add_row(
        "projected idle sandboxes in this host's RAM", str(r["projected_idle_sandboxes"]), "", ""
    )
    t.add_row(
        "load average at the end (1/5/15 min)", " ".join(f"{x:.2f}" for x in r["loadavg"]), "", ""
    )
    con.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=16, help="idle sandboxes to start (default 16)")
    ap.add_argument("--memory", type=int, default=512, help="guest RAM per sandbox, MiB")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds to let them go idle")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of CPU sampling")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.count < 1:
        ap.error("--count must be at least 1")
    raise_on_sigterm()
    r = measure(a.count, a.memory, a.settle, a.window)
    if a.json:
        import json

        print(json.dumps(r, indent=2))
    else:
        render(r)


if __name__ == "__main__":
    main()
