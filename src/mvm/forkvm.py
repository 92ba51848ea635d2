"""The VM side of fork: snapshot a running VM with a short pause, turn that snapshot into
a RAM file plus device state (a one-off boot template), and start children from it.

``save_live`` migrates while the guest runs (pre-copy) and stops it only for the last
pass: the pause is QEMU's reported downtime, not the whole write. ``make_image`` loads
the snapshot once into a QEMU whose RAM is a shared file (the guest never runs there)
and saves its device state without the RAM. Each child then maps that file privately
(``share=off``, copy-on-write, like a boot template's clones) and loads tens of KiB of
device state: the snapshot's memory is copied once, not once per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from mvm.errors import StateLoadError, VMError
from mvm.images.store import ImageStore
from mvm.vm import BOOT_TIMEOUT, MicroVM, VMSpec, base_config, new_id
from mvm.vmm.qemu import QemuProcess
from mvm.vmm.qmp import Qmp

#: Longest stop of the source QEMU may choose for the last pass (milliseconds).
DOWNTIME_LIMIT_MS = 300
#: Bytes per second the pre-copy may write (a local file: no reason to hold back).
MAX_BANDWIDTH = 8 << 30
#: How long a refused QMP connect is retried while QEMU lives.
QMP_RETRY_SECONDS = 5.0


@contextlib.asynccontextmanager
async def open_qmp(socket: Path, alive: Callable[[], bool]) -> AsyncIterator[Qmp]:
    """A QMP connection, retried briefly: QEMU binds its socket before it listens, and a
    connect in between (a loaded host) is refused although QEMU is fine."""
    deadline = time.monotonic() + QMP_RETRY_SECONDS
    while True:
        qmp = Qmp(socket)
        try:
            await qmp.connect()
            break
        except VMError:
            if not alive() or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)
    try:
        yield qmp
    finally:
        await qmp.close()


async def save_live(vm: MicroVM, path: Path) -> float:
    """Write ``vm``'s whole state to ``path`` while it runs; it runs again afterwards.
    Returns the seconds its CPUs stood still."""
    try:
        return await _save_live(vm, path)
    except VMError as exc:
        state = "running" if vm.qemu.alive() else f"exited: {vm.failure()[-300:]}"
        raise type(exc)(f"{exc} (source QEMU pid {vm.pid} {state})") from None


async def _save_live(vm: MicroVM, path: Path) -> float:
    async with open_qmp(vm.qemu.cfg.qmp_socket, vm.qemu.alive) as qmp:
        await qmp.execute(
            "migrate-set-parameters",
            # QEMU's default bandwidth cap (32 MiB/s) would make the copy take seconds.
            {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH},
        )
        # The stream make_image loads into shared RAM: without x-ignore-shared (a loader
        # refuses pages for a block it ignores, and the flag changes the stream format).
        await set_ignore_shared(qmp, False)
        t0 = time.monotonic()
        try:
            await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
            await qmp.wait_migration()
        finally:
            if await qmp.status() != "running":
                await qmp.execute("cont")
            await set_ignore_shared(qmp, True)
        info = await qmp.execute("query-migrate")
        downtime = info.get("downtime") if isinstance(info, dict) else None
    if isinstance(downtime, int | float) and downtime >= 0:
        return float(downtime) / 1000.0
    return time.monotonic() - t0


async def set_ignore_shared(qmp: Qmp, on: bool) -> None:
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": on}]},
    )


async def make_image(spec: VMSpec, state: Path, dest: Path, store: ImageStore) -> None:
    """``dest/ram`` (the snapshot's memory) and ``dest/state`` (its devices, no RAM)."""
    cfg = replace(
        base_config(spec, store, dest / "vm"),
        memory_file=dest / "ram",
        memory_shared=True,
        incoming=True,
    )
    qemu = QemuProcess(cfg)
    try:
        await qemu.start()
        await _load_and_save(qemu, state, dest)
    except VMError as exc:
        raise type(exc)(f"{exc}; QEMU said: {qemu.stderr_tail(500) or 'nothing'}") from None
    finally:
        await qemu.stop()


async def _load_and_save(qemu: QemuProcess, state: Path, dest: Path) -> None:
    async with open_qmp(qemu.cfg.qmp_socket, qemu.alive) as qmp:
        await qmp.execute("stop")  # while incoming: do not run the guest after loading
        await qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
        try:
            await qmp.wait_migration()
        except VMError as exc:
            raise StateLoadError(str(exc)) from None
        await qmp.ignore_shared_memory()  # the device state alone: children map the RAM
        await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(dest / 'state'))}"})
        await qmp.wait_migration()


async def start_child(
    spec: VMSpec, image: Path, store: ImageStore, vm_id: str, run_dir: Path
) -> MicroVM:
    """A VM loaded from ``make_image``'s output, its RAM a private mapping of the file."""
    cfg = replace(
        base_config(spec, store, run_dir),
        memory_file=image / "ram",
        memory_shared=False,
        incoming=True,
    )
    return await MicroVM._start(vm_id or new_id(), spec, cfg, BOOT_TIMEOUT, image / "state")
