"""How promptly mvm reacts: the durations the tests no longer assert (tests check outcomes).

Run: ``.venv/bin/python bench/responsiveness.py [--rounds N] [--json]``

Per round, on one VM (template restore) of the default image:

- ``concurrent``: ten ``sleep 1`` execs at once, wall time (1 s if they truly overlap);
- ``timeout``: ``exec(["sleep", "30"], timeout=1.5)``, time to the timed-out result;
- ``first_line``: ``echo a; sleep 2; echo b`` streamed, time to the first output frame
  (well under 2 s if output is not held until the command ends);
- ``qemu_kill``: on a second VM, a running ``sleep 30`` and QEMU SIGKILLed: time until
  the exec fails with VMDied.

Every QEMU it starts has its run directory under one ``/tmp/mvb-*`` directory; they are
killed (by pid) and the directory removed at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, err, kill_strays, raise_on_sigterm
from mvm.agent import protocol as P
from mvm.errors import VMDied
from mvm.images.store import ImageStore
from mvm.vm import MicroVM, VMSpec

OP_TIMEOUT = 60.0
ROWS = {
    "concurrent": "10 concurrent `sleep 1` execs, wall time",
    "timeout": "exec `sleep 30` with timeout 1.5 s, time to its result",
    "first_line": "streamed exec, time to the first output frame",
    "qemu_kill": "QEMU killed under a running exec, time to VMDied",
}


async def concurrent(vm: MicroVM) -> float:
    agent = vm.require_agent()
    t0 = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(*(agent.exec(["sleep", "1"]) for _ in range(10))), OP_TIMEOUT
    )
    if any(r.exit_code != 0 for r in results):
        raise RuntimeError("a sleep failed")
    return time.perf_counter() - t0


async def timeout(vm: MicroVM) -> float:
    t0 = time.perf_counter()
    r = await asyncio.wait_for(vm.require_agent().exec(["sleep", "30"], timeout=1.5), OP_TIMEOUT)
    if not r.timed_out:
        raise RuntimeError("the exec did not time out")
    return time.perf_counter() - t0


async def first_line(vm: MicroVM) -> float:
    t0 = time.perf_counter()
    first = None
    stream = vm.require_agent().exec_stream(["sh", "-c", "echo a; sleep 2; echo b"], timeout=30)
    async for f in stream:
        if f.type == P.OUT and first is None:
            first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no output")
    return first


async def qemu_kill(store: ImageStore) -> float:
    vm = await MicroVM.boot(VMSpec(store.ensure("python")), store=store)
    try:
        agent = vm.require_agent()
        task = asyncio.create_task(agent.exec(["sh", "-c", "touch /tmp/s; exec sleep 30"]))
        for _ in range(300):
            if (await agent.exec(["test", "-e", "/tmp/s"])).exit_code == 0:
                break
            await asyncio.sleep(0.1)
        assert vm.qemu.proc is not None
        t0 = time.perf_counter()
        vm.qemu.proc.kill()
        try:
            await asyncio.wait_for(task, OP_TIMEOUT)
        except VMDied:
            return time.perf_counter() - t0
        raise RuntimeError("the exec did not fail with VMDied")
    finally:
        await vm.destroy()


async def bench(rounds: int) -> dict[str, Row]:
    store = ImageStore()
    rows = {k: Row(k, label, "s") for k, label in ROWS.items()}
    vm = await MicroVM.boot(VMSpec(store.ensure("python")), store=store)
    try:
        for _ in range(rounds):
            rows["concurrent"].samples.append(await concurrent(vm))
            rows["timeout"].samples.append(await timeout(vm))
            rows["first_line"].samples.append(await first_line(vm))
            rows["qemu_kill"].samples.append(await qemu_kill(store))
    finally:
        await vm.destroy()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--json", action="store_true", help="print the samples as JSON")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    raise_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="mvb-", dir="/tmp"))
    os.environ["MVM_RUN_DIR"] = str(root / "vm")
    try:
        rows = asyncio.run(bench(args.rounds))
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    finally:
        kill_strays(str(root))
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({k: r.to_json() for k, r in rows.items()}, indent=2))
    else:
        for r in rows.values():
            samples = ", ".join(f"{s:.2f}" for s in r.samples)
            print(f"{r.label:<58} median {r.median:6.2f} s   ({samples})")


if __name__ == "__main__":
    main()
