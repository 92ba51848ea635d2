"""Live migration between two QEMUs over TCP, the stream encrypted and authenticated by
TLS with a pre-shared key (QEMU's ``tls-creds-psk``).

The destination starts a QEMU of the same shape with ``-incoming defer`` and listens
with ``migrate-incoming tcp:ADDR:0`` (QEMU picks the port and reports it); the source
runs ``migrate`` to it while its guest keeps running (pre-copy: RAM is sent, pages the
guest dirtied are sent again, and the guest stops only for the last pass, whose length
QEMU reports as ``downtime``). Both ends hold the same one-off 256-bit key, written to a
0600 file in the VM's run directory for QEMU to read and removed as soon as the
migration ends; a peer without it fails the TLS handshake and gets no page.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mvm.errors import VMError
from mvm.images.store import ImageStore
from mvm.vm import BOOT_TIMEOUT, MicroVM, VMSpec, base_config
from mvm.vmm.qemu import QemuProcess
from mvm.vmm.qmp import Qmp

#: The TLS identity both ends use (the key is what authenticates, not the name).
PSK_USER = "mvm"
TLS_ID = "mvm-mig-tls"
#: Longest stop of the guest QEMU may choose for the last pass (milliseconds).
DOWNTIME_LIMIT_MS = 300
#: Bytes per second the pre-copy may send (QEMU's default, 32 MiB/s, is for WANs).
MAX_BANDWIDTH = 1 << 30
#: How long a migration may run before it is cancelled (the guest never stopped long).
MIGRATE_TIMEOUT = float(os.environ.get("MVM_MIGRATE_TIMEOUT", "600"))
#: GnuTLS priorities for the stream: AES-128-GCM only (AES-NI). GnuTLS's default choice
#: made a 194 MiB migration take 6-10 s instead of 3 s on the 2-core TCG machine (the
#: same stream without TLS: 2.2 s). ``MVM_MIGRATE_TLS_PRIORITY`` overrides; empty: default.
TLS_PRIORITY = os.environ.get("MVM_MIGRATE_TLS_PRIORITY", "NORMAL:-CIPHER-ALL:+AES-128-GCM")
_HEX = frozenset("0123456789abcdef")


def check_key(key: str) -> str:
    if len(key) != 64 or not set(key) <= _HEX:
        raise VMError("a migration key is 64 lowercase hex digits")
    return key


def write_key(run_dir: Path, key: str) -> Path:
    """A directory holding ``keys.psk`` (QEMU's format: ``user:hexkey``), mode 0600."""
    d = run_dir / "migtls"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = d / "keys.psk"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{PSK_USER}:{check_key(key)}\n")
    return d


def drop_key(run_dir: Path) -> None:
    d = run_dir / "migtls"
    with contextlib.suppress(OSError):
        (d / "keys.psk").unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


async def _tls(qmp: Qmp, run_dir: Path, key: str, endpoint: str) -> None:
    d = write_key(run_dir, key)
    with contextlib.suppress(VMError):  # left by an earlier, failed migration
        await qmp.execute("object-del", {"id": TLS_ID})
    await qmp.execute(
        "object-add",
        {"qom-type": "tls-creds-psk", "id": TLS_ID, "endpoint": endpoint, "dir": str(d)}
        | ({"username": PSK_USER} if endpoint == "client" else {})
        | ({"priority": TLS_PRIORITY} if TLS_PRIORITY else {}),
    )
    await qmp.execute("migrate-set-parameters", {"tls-creds": TLS_ID})


async def _untls(qmp: Qmp, run_dir: Path) -> None:
    """Back to plain migration (snapshots use ``exec:`` streams, which must not be TLS)."""
    drop_key(run_dir)
    with contextlib.suppress(VMError):
        await qmp.execute("migrate-set-parameters", {"tls-creds": ""})
    with contextlib.suppress(VMError):
        await qmp.execute("object-del", {"id": TLS_ID})


@dataclass
class Incoming:
    """A destination QEMU waiting for the stream."""

    vm_id: str
    spec: VMSpec
    qemu: QemuProcess
    port: int
    started: float

    @property
    def run_dir(self) -> Path:
        return self.qemu.cfg.run_dir


async def start_incoming(
    spec: VMSpec, store: ImageStore, vm_id: str, run_dir: Path, listen: str, key: str
) -> Incoming:
    """Start a QEMU of ``spec`` listening for a TLS migration stream on ``listen``."""
    cfg = replace(base_config(spec, store, run_dir), incoming=True)
    qemu = QemuProcess(cfg)
    started = time.monotonic()
    await qemu.start()
    try:
        async with Qmp(cfg.qmp_socket) as qmp:
            await qmp.ignore_shared_memory()  # as every VM: the same stream format
            await _tls(qmp, cfg.run_dir, key, "server")
            await qmp.execute("migrate-incoming", {"uri": f"tcp:{listen}:0"})
            info = await qmp.execute("query-migrate")
        port = _listening_port(info)
    except BaseException:
        await qemu.stop()
        raise
    return Incoming(vm_id, spec, qemu, port, started)


def _listening_port(info: Any) -> int:
    for addr in info.get("socket-address", []) if isinstance(info, dict) else []:
        if isinstance(addr, dict) and addr.get("type") == "inet":
            return int(addr["port"])
    raise VMError("the incoming QEMU did not report its port")


async def finish_incoming(inc: Incoming, timeout: float = MIGRATE_TIMEOUT) -> MicroVM:
    """Wait for the stream to end, run the guest and connect to its agent."""
    from mvm.agent.client import AgentClient

    cfg = inc.qemu.cfg
    vm = MicroVM(inc.vm_id, inc.spec, inc.qemu)
    try:
        async with Qmp(cfg.qmp_socket) as qmp:
            await qmp.wait_migration(timeout)
            drop_key(cfg.run_dir)
            if await qmp.status() != "running":
                await qmp.execute("cont")
            await _untls(qmp, cfg.run_dir)
        vm.restored = True
        vm.agent = await AgentClient.connect(cfg.agent_socket)
        await vm.agent.hello(BOOT_TIMEOUT, alive=inc.qemu.alive)
    except BaseException:
        await vm.destroy()
        raise
    vm.boot_seconds = time.monotonic() - inc.started
    return vm


async def abort_incoming(inc: Incoming) -> None:
    vm = MicroVM(inc.vm_id, inc.spec, inc.qemu)
    await vm.destroy()


async def migrate_out(
    vm: MicroVM, uri: str, key: str, timeout: float = MIGRATE_TIMEOUT
) -> dict[str, Any]:
    """Send ``vm`` to the QEMU listening at ``uri`` (pre-copy). On success the source is
    left stopped (``postmigrate``): the caller removes it once the destination runs, or
    :func:`resume_source` runs it again. On failure it runs again here."""
    if not uri.startswith("tcp:"):
        raise VMError("a live migration goes over tcp:HOST:PORT")
    cfg = vm.qemu.cfg
    t0 = time.monotonic()
    async with Qmp(cfg.qmp_socket) as qmp:
        await _tls(qmp, cfg.run_dir, key, "client")
        try:
            await qmp.execute(
                "migrate-set-parameters",
                {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH},
            )
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "auto-converge", "state": True}]},
            )
            await qmp.execute("migrate", {"uri": uri})
            info = await _wait(qmp, timeout)
        except BaseException:
            with contextlib.suppress(VMError):
                await qmp.execute("migrate_cancel")
            with contextlib.suppress(VMError):
                await _wait(qmp, 30.0, settle=True)
            if await qmp.status() != "running":
                await qmp.execute("cont")
            await _untls(qmp, cfg.run_dir)
            raise
        drop_key(cfg.run_dir)
    ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
    return {
        "downtime_ms": _num(info.get("downtime")),
        "total_ms": _num(info.get("total-time")),
        "setup_ms": _num(info.get("setup-time")),
        "ram_bytes": _num(ram.get("transferred")),
        "dirty_sync_count": _num(ram.get("dirty-sync-count")),
        "wall_seconds": round(time.monotonic() - t0, 3),
    }


def _num(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


async def _wait(qmp: Qmp, timeout: float, settle: bool = False) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed" and not settle:
            return dict(info)
        if status in ("failed", "cancelled", "completed"):
            if settle:
                return dict(info)
            desc = str(info.get("error-desc", "no detail"))[:300]
            raise VMError(f"migration {status}: {desc}")
        if time.monotonic() > deadline:
            raise VMError(f"migration did not complete within {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def resume_source(vm: MicroVM) -> None:
    """Run a source whose migration went through but whose destination failed."""
    cfg = vm.qemu.cfg
    async with Qmp(cfg.qmp_socket) as qmp:
        if await qmp.status() != "running":
            await qmp.execute("cont")
        await _untls(qmp, cfg.run_dir)
