"""SDK round-trip benchmark: ``commands.run(["true"])`` vs ``mvmctl exec NAME -- true`` vs a
raw agent ping, side by side in one run.

Run: ``.venv/bin/python bench/sdk.py [--rounds N] [--json]``

Everything runs against a private, throw-away ``MVM_HOME`` (``/tmp/mvsb-*``) whose
``images``, ``rootfs``, ``kernels``, ``initramfs`` and ``templates`` are symlinks to the
default store (nothing is rebuilt). One sandbox serves the SDK, the Client and the CLI;
the agent rows use an in-process VM of the same shape (template restore), talked to
directly. Variants alternate round by round, so host noise hits all alike. At the end
(also on Ctrl-C / SIGTERM) the sandbox is removed, mvmd stopped, leftover QEMUs for the
home killed by pid, and the home deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_store, private_home, raise_on_sigterm, timer

IMAGE = "python"
OP_TIMEOUT = 60.0
BOOT_WAIT = 180.0

ROWS = [
    ("sdk_run", "SDK sandbox.commands.run(['true'])"),
    ("client_exec", "Client.exec_stream `true` (HTTP to mvmd, no SDK)"),
    ("cli_exec", "`mvmctl exec NAME -- true` (a new process each time)"),
    ("agent_exec", "agent exec `true`, in-process VM (no mvmd)"),
    ("agent_ping", "raw agent ping, in-process VM"),
]


def run(args: argparse.Namespace, home: Path) -> dict[str, list[float]]:
    import mvm
    from mvm.api import models as M
    from mvm.client import Client
    from mvm.images.store import ImageStore
    from mvm.vm import MicroVM, VMSpec

    samples: dict[str, list[float]] = {k: [] for k, _ in ROWS}
    store = ImageStore()
    img = store.ensure(IMAGE)
    sandbox = mvm.Sandbox.create(IMAGE, name="bench", ttl="30m")
    client = Client()
    loop = asyncio.new_event_loop()
    vm = loop.run_until_complete(
        asyncio.wait_for(
            MicroVM.boot(VMSpec(img, cpus=1, memory_mb=512, overlay_size="256m"), store=store),
            BOOT_WAIT,
        )
    )
    agent = vm.require_agent()
    cli = [sys.executable, "-m", "mvm.cli.main", "exec", "bench", "--", "true"]

    def sdk_run() -> None:
        assert sandbox.commands.run(["true"]).exit_code == 0

    def client_exec() -> None:
        ends = [
            e for e in client.exec_stream("bench", M.ExecRequest(argv=["true"])) if e.type == "exit"
        ]
        assert ends and ends[0].exit_code == 0

    def cli_exec() -> None:
        subprocess.run(cli, check=True, timeout=OP_TIMEOUT, capture_output=True)

    def agent_exec() -> None:
        r = loop.run_until_complete(agent.exec(["true"], timeout=OP_TIMEOUT))
        assert r.exit_code == 0

    def agent_ping() -> None:
        loop.run_until_complete(agent.ping(timeout=OP_TIMEOUT))

    fns = {
        "sdk_run": sdk_run,
        "client_exec": client_exec,
        "cli_exec": cli_exec,
        "agent_exec": agent_exec,
        "agent_ping": agent_ping,
    }
    try:
        for fn in fns.values():  # warm-up: first requests after a restore page memory in
            fn()
            fn()
        for rnd in range(args.rounds):
            order = list(fns)[rnd % len(fns) :] + list(fns)[: rnd % len(fns)]
            for key in order:
                with timer() as t:
                    fns[key]()
                    samples[key].append(t() * 1000)
    finally:
        loop.run_until_complete(vm.destroy())
        loop.close()
        client.close()
        with contextlib.suppress(Exception):
            sandbox.destroy()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    raise_on_sigterm()
    with private_home(default_store(), prefix="mvsb-") as home:
        os.environ.pop("MVM_RUN_DIR", None)
        samples = run(args, home)
    base = statistics.median(samples["agent_ping"])
    result = {
        k: {
            "label": label,
            "median_ms": statistics.median(samples[k]),
            "min_ms": min(samples[k]),
            "max_ms": max(samples[k]),
            "x_ping": statistics.median(samples[k]) / base,
            "samples": samples[k],
        }
        for k, label in ROWS
    }
    if args.json:
        print(json.dumps({"rounds": args.rounds, "rows": result}, indent=2))
        return
    table = Table(title=f"round trips, median of {args.rounds} (ms), interleaved")
    for col in ("what", "median", "min", "max", "× ping"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for k, label in ROWS:
        r = result[k]
        table.add_row(
            label,
            f"{r['median_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            f"{r['max_ms']:.1f}",
            f"{r['x_ping']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
