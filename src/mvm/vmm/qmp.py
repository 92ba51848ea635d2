"""QMP through ``qemu.qmp``: one connection, every command bounded in time, and the
migration steps snapshots are made of."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from mvm.errors import VMError

CONNECT_TIMEOUT = 5.0
#: Pause between tries when QEMU has not started listening yet.
CONNECT_RETRY = 0.02
COMMAND_TIMEOUT = 30.0
#: How long a device-state save or restore may take before it counts as failed.
MIGRATION_TIMEOUT = 120.0


class Qmp:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._client = QMPClient("mvm")

    async def connect(self) -> None:
        """Connect, retrying a refused connection until ``CONNECT_TIMEOUT``: QEMU creates
        the socket file at bind() and listens a moment later, so under load a client can
        arrive in between (seen as ECONNREFUSED on ~1 in 15 starts at a load of 12)."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._client.connect(str(self.socket)), max(left, 0.01))
                return
            except (TimeoutError, OSError, QMPError) as exc:
                # qemu.qmp wraps the cause in ConnectError(.exc).
                cause = getattr(exc, "exc", exc)
                retry = isinstance(cause, ConnectionRefusedError | FileNotFoundError)
                if not retry or time.monotonic() + CONNECT_RETRY > deadline:
                    raise VMError(f"cannot connect to QMP at {self.socket}: {exc!r}") from None
                self._client = QMPClient("mvm")
                await asyncio.sleep(CONNECT_RETRY)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), CONNECT_TIMEOUT)

    async def __aenter__(self) -> Qmp:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, args), timeout)
        except TimeoutError:
            raise VMError(f"QMP {command} did not answer within {timeout:.0f}s") from None
        except (QMPError, EOFError, OSError) as exc:
            raise VMError(f"QMP {command} failed: {exc}") from None

    async def status(self) -> str:
        reply = await self.execute("query-status")
        return str(reply.get("status", "unknown"))

    async def ignore_shared_memory(self) -> None:
        """Skip RAM that lives in a shared file when migrating: a snapshot is then only
        the device state (tens of KiB), and clones map the RAM file instead."""
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )

    async def wait_migration(self, timeout: float = MIGRATION_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VMError(f"migration {status}: {info.get('error-desc', 'no detail')}")
            if time.monotonic() > deadline:
                raise VMError(f"migration did not complete within {timeout:.0f}s")
            await asyncio.sleep(0.005)

    async def save_state(self, path: Path) -> None:
        """Stop the VM and write its state (devices, and RAM unless ignored) to ``path``."""
        await self.execute("stop")
        await self.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
        await self.wait_migration()

    async def restore_state(self, path: Path) -> None:
        """Load state into a QEMU started with ``-incoming defer``, then run it."""
        await self.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
        await self.wait_migration()
        await self.execute("cont")
