"""The sandbox service: the only code that creates, runs commands in, copies files into,
forwards ports of, pauses, snapshots and removes sandboxes, and that owns admission,
secrets, redaction, audit and egress for each of those verbs.

mvmd's HTTP API (``mvm.daemon.server``) and ``mvmctl run`` (``mvm.oneshot``, an
ephemeral sandbox in-process) are adapters over one ``SandboxService``.
"""

from __future__ import annotations

import asyncio

from mvm import forkvm
from mvm.api import models as M
from mvm.images.store import ImageStore
from mvm.service.builders import Builders
from mvm.service.core import Core
from mvm.service.execs import Execs
from mvm.service.files import Files
from mvm.service.fork import Fork
from mvm.service.gate import Gate
from mvm.service.live import Live, audit_after, info
from mvm.service.migration import Migration
from mvm.service.pool import Pool
from mvm.service.ports import Ports
from mvm.service.procs import Procs
from mvm.service.sandboxes import Sandboxes
from mvm.service.snapshots import Snapshots
from mvm.state import StateDB


class SandboxService:
    """Every verb, grouped: ``sandboxes``, ``execs``, ``files``, ``procs``, ``ports``,
    ``snapshots``; ``core`` holds what they share (live sandboxes, secrets, policy gate)."""

    def __init__(
        self,
        db: StateDB,
        store: ImageStore | None = None,
        gate: Gate | None = None,
        *,
        pool: bool = False,
    ) -> None:
        self.core = Core(db, store, gate)
        self.ports = Ports(self.core)
        self.sandboxes = Sandboxes(self.core, self.ports)
        #: Waiting VMs (mvmd only: a one-shot run has no later create to serve).
        self.pool = Pool(self.core.store, enabled=pool)
        self.sandboxes.pool = self.pool
        self.execs = Execs(self.core)
        self.files = Files(self.core)
        self.procs = Procs(self.core)
        self.snapshots = Snapshots(self.core, self.sandboxes, self.ports)
        self.fork = Fork(self.core, self.sandboxes, self.snapshots)
        self.migration = Migration(self.core, self.sandboxes)
        self.builders = Builders(self.sandboxes)

    def note_call(self, note: M.CallNote, sandbox: str | None) -> str | None:
        """Audit an adapter's own call (``<via>.call``), on ``sandbox`` when it names one
        (which must exist: a record is routed to its tenant's chain)."""
        if sandbox is not None:
            self.core.get(sandbox)
        return audit_after(f"{note.via}.call", sandbox, call=note.call)

    @property
    def ready(self) -> asyncio.Event:
        """Set once every recorded sandbox is reattached (or failed)."""
        return self.sandboxes.ready

    async def start(self) -> None:
        forkvm.reap_orphan_ram()  # a killed mvmd's half-made fork
        await self.sandboxes.start()
        self.pool.reap_orphans({live.rec.pid for live in self.core.live.values() if live.rec.pid})

    async def close(self) -> None:
        await self.pool.close()  # waiting VMs belong to this mvmd only
        await self.builders.close()
        await self.sandboxes.close()


__all__ = ["Gate", "Live", "SandboxService", "info"]
