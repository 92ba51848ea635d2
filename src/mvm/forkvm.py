"""The VM side of fork: snapshot a running VM with a short pause, turn that snapshot into
a RAM file plus device state (a one-off boot template), and start children from it.

Fork streams the running source straight into a *loader*: a QEMU started with
``-incoming`` whose RAM is a shared file (the guest never runs there). The source migrates
while its guest runs (pre-copy) and stops only for the last pass (the pause is QEMU's
reported downtime); the loader writes the pages into the file as they arrive, so the save
and the load overlap and no stream file is written or read back (``start_loader``,
``stream_into``, ``finish_image``). The loader then saves its device state without the
RAM. Each child maps that file privately (``share=off``, copy-on-write, like a boot
template's clones) and loads tens of KiB of device state: the snapshot's memory is copied
once, not once per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from mvm.errors import StateLoadError, VMError
from mvm.images.store import ImageStore
from mvm.vm import BOOT_TIMEOUT, MicroVM, VMSpec, base_config, new_id
from mvm.vmm.argv import VMConfig
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


async def _migrate_live(vm: MicroVM, uri: str) -> float:
    async with open_qmp(vm.qemu.cfg.qmp_socket, vm.qemu.alive) as qmp:
        await qmp.execute(
            "migrate-set-parameters",
            # QEMU's default bandwidth cap (32 MiB/s) would make the copy take seconds.
            {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH},
        )
        # The stream the loader takes into its shared RAM: without x-ignore-shared (a loader
        # refuses pages for a block it ignores, and the flag changes the stream format).
        await set_ignore_shared(qmp, False)
        t0 = time.monotonic()
        try:
            await qmp.execute("migrate", {"uri": uri})
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


def place_ram(dest: Path, memory_mb: int) -> None:
    """Put the fork's shared RAM file (``dest/ram``, a symlink) on tmpfs when there is room
    for twice the guest's memory: QEMU loads pages into a tmpfs file about 1.8x faster than
    into one on ext4 (bench/README.md), and the pages are the children's memory either
    way. ``MVM_FORK_RAM_DIR`` picks another directory; empty: beside the work directory."""
    dest.mkdir(parents=True, exist_ok=True)
    where = os.environ.get("MVM_FORK_RAM_DIR", "/dev/shm")
    if not where:
        return
    try:
        st = os.statvfs(where)
        if st.f_bavail * st.f_frsize < 2 * (memory_mb << 20):
            return
        # The pid in the name lets a later mvmd remove what a killed one left
        # (reap_orphan_ram).
        fd, name = tempfile.mkstemp(prefix=f"mvm-fork-{os.getpid()}-", dir=where)
        os.close(fd)  # created here: QEMU opens it through the link (no O_CREAT|O_EXCL)
    except OSError:
        return
    try:
        (dest / "ram").symlink_to(name)
    except OSError:
        os.unlink(name)


def reap_orphan_ram() -> list[str]:
    """Remove shared RAM files whose mvmd died mid-fork (``place_ram`` unlinks them as
    soon as the children hold their mappings). Returns what it removed."""
    where = os.environ.get("MVM_FORK_RAM_DIR", "/dev/shm")
    removed: list[str] = []
    if not where:
        return removed
    for path in Path(where).glob("mvm-fork-*-*"):
        pid = path.name.split("-")[2]
        if not pid.isdecimal() or path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_uid != os.getuid() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(str(path))
    return removed


def remove_ram(dest: Path) -> None:
    """Remove what ``place_ram`` made outside ``dest`` (children keep their mappings)."""
    link = dest / "ram"
    if link.is_symlink():
        with contextlib.suppress(OSError):
            os.unlink(os.readlink(link))


def _loader_config(spec: VMSpec, dest: Path, store: ImageStore) -> VMConfig:
    return replace(
        base_config(spec, store, dest / "vm"),
        memory_file=dest / "ram",
        memory_shared=True,
        incoming=True,
    )


async def start_loader(spec: VMSpec, dest: Path, store: ImageStore) -> QemuProcess:
    """A QEMU of ``spec``'s shape whose RAM is the shared file ``dest/ram``, listening for
    a migration on ``dest/vm/in.sock`` (it never runs the guest)."""
    qemu = QemuProcess(_loader_config(spec, dest, store))
    try:
        await qemu.start()
        async with open_qmp(qemu.cfg.qmp_socket, qemu.alive) as qmp:
            await qmp.execute("stop")  # while incoming: do not run the guest after loading
            await qmp.execute("migrate-incoming", {"uri": f"unix:{_in_socket(qemu)}"})
    except VMError as exc:
        await qemu.stop()
        raise type(exc)(f"{exc}; QEMU said: {qemu.stderr_tail(500) or 'nothing'}") from None
    except BaseException:
        await qemu.stop()
        raise
    return qemu


def _in_socket(loader: QemuProcess) -> Path:
    return loader.cfg.run_dir / "in.sock"


async def stream_into(vm: MicroVM, loader: QemuProcess) -> float:
    """Migrate running ``vm`` into ``loader`` (pre-copy; it runs again afterwards) and wait
    until the loader has every page. Returns the seconds ``vm``'s CPUs stood still."""
    sock = _in_socket(loader)
    deadline = time.monotonic() + QMP_RETRY_SECONDS
    while not sock.exists():  # QEMU creates it when it handles migrate-incoming
        if not loader.alive() or time.monotonic() > deadline:
            raise VMError(f"the fork loader did not listen: {loader.stderr_tail(300)}")
        await asyncio.sleep(0.01)
    async with open_qmp(loader.cfg.qmp_socket, loader.alive) as lq:
        try:
            paused = await save_live_uri(vm, f"unix:{sock}")
            await lq.wait_migration()
        except VMError as exc:
            raise StateLoadError(f"{exc}; loader said: {loader.stderr_tail(300)}") from None
    return paused


async def save_live_uri(vm: MicroVM, uri: str) -> float:
    """Migrate ``vm`` to ``uri`` while it runs (pre-copy); it runs again afterwards.
    Returns the seconds its CPUs stood still."""
    try:
        return await _migrate_live(vm, uri)
    except VMError as exc:
        state = "running" if vm.qemu.alive() else f"exited: {vm.failure()[-300:]}"
        raise type(exc)(f"{exc} (source QEMU pid {vm.pid} {state})") from None


async def finish_image(loader: QemuProcess, dest: Path) -> None:
    """``dest/state``: the loader's device state without the RAM (already in ``dest/ram``);
    the loader is stopped afterwards, in every case."""
    try:
        async with open_qmp(loader.cfg.qmp_socket, loader.alive) as qmp:
            await qmp.ignore_shared_memory()
            await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(dest / 'state'))}"})
            await qmp.wait_migration()
    finally:
        await loader.stop()


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
