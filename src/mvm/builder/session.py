"""Where a build gets its builder VM: the sandbox service's builder-kind sandboxes
(``mvm.service.builders``), through mvmd when it runs, else in this process.

With mvmd: ``claim`` takes a warm builder (``mvmctl builder up``, or the one booted after
the previous build) or boots one, and ``release`` downs it and boots its replacement in
mvmd's background, kept for the idle time. Without mvmd: an in-process service boots one
builder for this build and removes it (nothing stays running, as ``mvmctl run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mvm import paths
from mvm.api import models as M
from mvm.errors import MvmError
from mvm.service.builders import BuilderRequest, Claimed, default_idle

if TYPE_CHECKING:
    from mvm.client import Client


class Session(Protocol):
    mode: str

    async def claim(self, allow: list[str]) -> Claimed: ...

    async def run(self, name: str, req: M.ExecRequest) -> M.ExecResult: ...

    async def release(self, name: str) -> None: ...


class LocalSession:
    """An in-process sandbox service for one build (``mvmctl run``'s way)."""

    mode = "local"

    def __init__(self, service: object) -> None:
        from mvm.service import SandboxService

        assert isinstance(service, SandboxService)
        self.s = service

    async def claim(self, allow: list[str]) -> Claimed:
        return await self.s.builders.claim(BuilderRequest(allow=allow, idle_seconds=0))

    async def run(self, name: str, req: M.ExecRequest) -> M.ExecResult:
        return await self.s.execs.run(name, req)

    async def release(self, name: str) -> None:
        await self.s.builders.release(name)


class DaemonSession:
    """mvmd's builders, over its API (the host files of a builder are this user's)."""

    mode = "mvmd"

    def __init__(self, client: Client) -> None:
        self.c = client

    async def claim(self, allow: list[str]) -> Claimed:
        req = BuilderRequest(allow=allow, idle_seconds=default_idle())
        return await asyncio.to_thread(
            self.c._post, "/builders/claim", Claimed, req, timeout=1800.0
        )

    async def run(self, name: str, req: M.ExecRequest) -> M.ExecResult:
        return await asyncio.to_thread(lambda: M.gather_exec(self.c.exec_stream(name, req)))

    async def release(self, name: str) -> None:
        from mvm.client import seg

        path = f"/builders/{seg('sandbox', name)}/release"
        await asyncio.to_thread(self.c._post, path, M.SandboxInfo, None, timeout=300.0)


def running_daemon() -> Client | None:
    """A client of this user's local mvmd when it answers (never started for a build)."""
    from mvm.client import Client, remote_url

    if remote_url() is not None:
        return None  # a remote server's builder disks are not this host's files
    try:
        client = Client(autostart=False)
        if client.ping() is not None:
            return client
        client.close()
    except (MvmError, OSError):
        pass
    return None


@contextlib.asynccontextmanager
async def open_session() -> AsyncIterator[Session]:
    client = running_daemon()
    if client is not None:
        try:
            yield DaemonSession(client)
        finally:
            client.close()
        return
    from mvm.service import SandboxService
    from mvm.service.live import ACTOR
    from mvm.state import StateDB

    parent = paths.run_dir()
    parent.mkdir(parents=True, exist_ok=True)
    token = ACTOR.set("builder")
    try:
        with tempfile.TemporaryDirectory(prefix="build-", dir=parent) as tmp:
            db = StateDB(Path(tmp) / "state.db")
            service = SandboxService(db)
            try:
                yield LocalSession(service)
            finally:
                await service.close()
                db.close()
    finally:
        ACTOR.reset(token)
