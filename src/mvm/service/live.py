"""A sandbox the service is serving, its public view, and the audit helpers every verb uses."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mvm import audit, redact
from mvm.api import models as M
from mvm.daemon.egress import EgressProxy
from mvm.daemon.logbook import LogBook
from mvm.errors import MvmError
from mvm.state import SandboxRecord
from mvm.vm import MicroVM

if TYPE_CHECKING:
    from mvm.service.proclog import ProcLog

log = logging.getLogger(__name__)

#: Who acts in this context's audit records: mvmd, or ``mvmctl`` for a one-shot run.
ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("mvm_actor", default="mvmd")


@dataclass
class Live:
    """A sandbox the service is serving."""

    rec: SandboxRecord
    vm: MicroVM | None = None
    logbook: LogBook | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    forwards: list[M.ForwardInfo] = field(default_factory=list)
    #: Audit id of the last lifecycle record (launched, paused, ...): goes into SandboxInfo.
    audit_id: str | None = None
    #: Background processes started here -> audit id of their exit record (None: running).
    procs: dict[int, str | None] = field(default_factory=dict)
    #: Knows every secret value injected here: output and log lines pass through it.
    redactor: redact.Redactor = field(default_factory=redact.Redactor)
    #: The sandbox's egress proxy (None: no network).
    egress: EgressProxy | None = None
    #: Why the guest agent counts as unresponsive (None: it answers); set by service.health.
    unresponsive: str | None = None
    #: What of each background process's output is in the log (service.proclog).
    proclog: ProcLog | None = None

    @property
    def name(self) -> str:
        return self.rec.name

    def note(self, line: str) -> None:
        if self.logbook is not None:
            self.logbook.note(line)


def info(live: Live) -> M.SandboxInfo:
    r = live.rec
    return M.SandboxInfo(
        id=r.id,
        name=r.name,
        image=r.image,
        state=r.state,
        cpus=r.cpus,
        memory_mb=r.memory_mb,
        disk_mb=r.disk_mb,
        created=r.created,
        expires_at=r.expires_at,
        ttl_left=r.ttl_left(),
        pid=r.pid,
        reason=r.reason,
        boot_seconds=live.vm.boot_seconds if live.vm else None,
        forwards=list(live.forwards),
        audit_id=live.audit_id,
        network=M.NetworkSpec(preset=r.network.preset, allow=list(r.network.allow)),
        workload_id=r.workload_id,
        tags=dict(r.tags),
        unresponsive=live.unresponsive if r.state == "running" else None,
        limits=r.limits,
    )


def audit_after(event: str, sandbox: str | None, **fields: Any) -> str | None:
    """Audit something that already happened: a failing log is logged, not raised, so the
    caller's result is not lost. (Records made *before* acting use ``audit.record`` and fail
    closed.)"""
    try:
        return audit.record(event, actor=ACTOR.get(), sandbox=sandbox, **fields)
    except MvmError as exc:
        log.error("audit record %s for %s failed: %s", event, sandbox, exc)
        return None


def audit_before(event: str, sandbox: str | None, **fields: Any) -> str:
    """Audit something about to happen: a failing log raises, and it does not happen."""
    return audit.record(event, actor=ACTOR.get(), sandbox=sandbox, **fields)


def reason_fields(reason: str) -> dict[str, Any]:
    """A failure reason for the audit log: its first clause (mvm's own words) and a hash
    (the rest may quote guest console output)."""
    return {
        "reason": reason.split(":", 1)[0][:120],
        "reason_sha256": audit.sha256_hex(reason.encode()),
    }
