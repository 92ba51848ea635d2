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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

IMAGE = "python"
LINKED = ("images", "rootfs", "kernels", "initramfs", "templates")
OP_TIMEOUT = 60.0
BOOT_WAIT = 180.0
err = Console(stderr=True, soft_wrap=True)

ROWS = [
    ("sdk_run", "SDK sandbox.commands.run(['true'])"),
    ("client_exec", "Client.exec_stream `true` (HTTP to mvmd, no SDK)"),
    ("cli_exec", "`mvmctl exec NAME -- true` (a new process each time)"),
    ("agent_exec", "agent exec `true`, in-process VM (no mvmd)"),
    ("agent_ping", "raw agent ping, in-process VM"),
]


def make_home(default_home: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="mvsb-", dir="/tmp"))
    for name in LINKED:
        target = default_home / name
        if target.is_dir():
            (home / name).symlink_to(target)
    return home


def procs_for(home: Path, qemu: bool) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        argv0 = os.path.basename(cmd.split(b"\0", 1)[0].decode(errors="replace"))
        if (qemu and "qemu" in argv0 and str(home).encode() in cmd) or (
            not qemu and b"mvm.daemon" in cmd and f"MVM_HOME={home}".encode() in env
        ):
            found.append(int(d.name))
    return found


def cleanup(home: Path) -> None:
    from mvm.client import Client
    from mvm.errors import MvmError

    with contextlib.suppress(MvmError, OSError), Client(autostart=False, timeout=15.0) as c:
        if c.ping() is not None:
            for s in c.list_sandboxes():
                with contextlib.suppress(MvmError):
                    c.down(s.name)
            c.shutdown()
    deadline = time.monotonic() + 10
    while procs_for(home, False) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.1)
    for pid in procs_for(home, False) + procs_for(home, True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in LINKED:
        link = home / name
        if link.is_symlink():
            link.unlink()
    shutil.rmtree(home, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


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
                samples[key].append(timed(fns[key]))
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
    from mvm import paths

    default_home = paths.home()
    home = make_home(default_home)
    os.environ["MVM_HOME"] = str(home)
    os.environ.pop("MVM_RUN_DIR", None)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        samples = run(args, home)
    finally:
        cleanup(home)
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
