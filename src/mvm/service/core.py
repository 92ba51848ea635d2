"""What every verb of the sandbox service shares: the live sandboxes, lookup by name and
state, secrets, the egress proxy, console/event wiring, teardown and failure.

The verbs themselves live beside it (sandboxes, execs, files, procs, ports, snapshots);
each takes this core. Nothing here speaks HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvm import names, paths, redact, state, tenancy
from mvm.agent.client import AgentClient
from mvm.audit import log as audit_log
from mvm.daemon.egress import EgressProxy, Verdict, policy_for
from mvm.daemon.forwards import Forwards
from mvm.errors import MvmError, PolicyDenied, SandboxNotFound, SandboxStateError
from mvm.images.store import Image, ImageStore
from mvm.policy.network import Policy as NetPolicy
from mvm.secrets import SecretStore
from mvm.service import postmortem, proclog
from mvm.service.builders import builder_disks
from mvm.service.gate import Gate
from mvm.service.live import Live, audit_after, reason_fields
from mvm.state import SandboxRecord, StateDB
from mvm.vm import VMSpec

log = logging.getLogger(__name__)


def spec_for(rec: SandboxRecord, image: Image, network: bool) -> VMSpec:
    """The VM shape a sandbox record asks for (the same on create, reattach and restore)."""
    return VMSpec(
        image,
        cpus=rec.cpus,
        memory_mb=rec.memory_mb,
        overlay_size=f"{rec.disk_mb}m",
        network=network,
        disks=builder_disks(rec),  # builder-kind sandboxes only (service.builders)
    )


def new_record(
    fields: dict[str, Any], *, vm_id: str, name: str, image_id: str, ttl_seconds: float
) -> SandboxRecord:
    """The record of a sandbox about to be made (create, recreate, fork): ``fields`` is its
    shape (``M.shape_fields``, adjusted), the rest is what every new sandbox gets,
    including whose it is (the tenant of a request `mvmctl serve` relayed, and its token)."""
    now = time.time()
    who = audit_log.acting()
    if who is not None and not tenancy.owns(who[0], name):
        # A relayed request names only its tenant's sandboxes (mvmctl serve maps them);
        # a child, a copy or a new one outside that namespace is refused here too.
        raise PolicyDenied(f"sandbox {name} is not in the namespace of tenant {who[0]}")
    return SandboxRecord(
        tenant=who[0] if who else None,
        token_id=who[1] if who else None,
        **fields,
        id=vm_id,
        name=name,
        image_id=image_id,
        state=state.CREATING,
        created=now,
        expires_at=now + ttl_seconds,
        run_dir=str(paths.run_dir() / vm_id),
    )


class Core:
    def __init__(self, db: StateDB, store: ImageStore | None = None, gate: Gate | None = None):
        self.db = db
        self.store = store or ImageStore()
        self.live: dict[str, Live] = {}
        self.create_lock = asyncio.Lock()
        self.secrets = SecretStore()
        self.gate = gate or Gate()
        self.forwards = Forwards(db, lambda sandbox_id: self.running(sandbox_id)[1])
        audit_log.route_sandboxes(self.tenant_of)

    def tenant_of(self, name: str) -> str | None:
        """The tenant owning sandbox ``name`` (None: the host owner's, or unknown): the
        audit log routes every record about it there, whoever acts and when."""
        live = self.live.get(name)
        return live.rec.tenant if live is not None else None

    # -- lookup -------------------------------------------------------------------------
    def get(self, name: str) -> Live:
        names.check("sandbox", name)
        live = self.live.get(name)
        if live is None:
            for candidate in self.live.values():
                if candidate.rec.id == name:
                    return candidate
            raise SandboxNotFound(
                f"no sandbox named {name!r}",
                hint="see `mvmctl ls`",
                sandbox=name,
            )
        return live

    def running(self, name: str) -> tuple[Live, AgentClient]:
        live = self.get(name)
        if live.rec.state == state.PAUSED:
            raise SandboxStateError(
                f"sandbox {name} is paused",
                hint=f"resume it: mvmctl resume {name}",
                sandbox=name,
                state=str(live.rec.state),
            )
        if live.rec.state != state.RUNNING or live.vm is None:
            reason = f": {live.rec.reason}" if live.rec.reason else ""
            raise SandboxStateError(
                f"sandbox {name} is {live.rec.state}{reason}",
                sandbox=name,
                state=str(live.rec.state),
            )
        return live, live.vm.require_agent()

    def serving(self, name: str) -> Live:
        """A sandbox with a VM (running or paused)."""
        live = self.get(name)
        if live.rec.state not in (state.RUNNING, state.PAUSED) or live.vm is None:
            raise SandboxStateError(
                f"sandbox {name} is {live.rec.state}", sandbox=name, state=str(live.rec.state)
            )
        return live

    # -- secrets ------------------------------------------------------------------------
    def resolve_secrets(self, live: Live | None, refs: Mapping[str, str]) -> dict[str, str]:
        """``{ENV: name}`` -> ``{ENV: value}`` from the store, now (an unknown name fails
        before anything starts); the values are taught to the redactors on the way."""
        if not refs:
            return {}
        values = self.secrets.resolve(refs)
        by_name = {refs[k]: v for k, v in values.items()}
        redact.known.add(by_name)
        if live is not None:
            live.redactor = live.redactor.merged(by_name)
            if live.logbook is not None:
                live.logbook.redactor = live.redactor
        return values

    def command_env(
        self, live: Live, env: Mapping[str, str], refs: Mapping[str, str], user: str | None
    ) -> dict[str, str]:
        """The environment of one command, after the policy allowed its secrets and user:
        the sandbox's, the call's, then its secrets (only this process gets the values;
        the sandbox record keeps names)."""
        self.gate.exec(live.name, list(refs.values()), user)
        secret_values = self.resolve_secrets(live, {**live.rec.secret_env, **refs})
        return {**live.rec.env, **env, **secret_values}

    # -- images, egress, wiring -----------------------------------------------------------
    def image_for(self, rec: SandboxRecord) -> Image:
        image = self.store.find(rec.image)
        if image is None or image.id != rec.image_id:
            # The name now points at a rebuilt image; the sandbox keeps what it booted.
            for img in self.store.all():
                if img.id == rec.image_id:
                    return img
            if image is None:
                raise SandboxStateError(f"image {rec.image} of {rec.name} is gone")
        return image

    async def start_egress(self, live: Live, policy: NetPolicy | None = None) -> bool:
        """Open the sandbox's egress proxy on ``<run dir>/egress.sock`` if its policy has a
        network (also after an mvmd restart: same path). Returns whether it has one."""
        rec = live.rec
        pol = (
            policy
            if policy is not None
            else await policy_for(rec.network.preset, list(rec.network.allow))
        )
        if not pol.enabled:
            return False

        def note(v: Verdict) -> None:
            what = "allowed" if v.allowed else f"denied ({v.rule}: {v.reason})"
            live.note(f"egress {v.host}:{v.port} {what}")

        live.egress = EgressProxy(
            live.name, pol, Path(rec.run_dir) / "egress.sock", on_decision=note
        )
        # Its connections outlive the request that made it: their records are mvmd's.
        await asyncio.create_task(live.egress.start(), context=audit_log.own_context())
        return True

    async def close_egress(self, live: Live) -> None:
        if live.egress is not None:
            await live.egress.close()
            live.egress = None

    def wire(self, live: Live, *, fresh: bool = True) -> None:
        """Route console output and guest events into the sandbox's log (``fresh``: a new
        guest; else one an earlier mvmd served, whose missed process output is recovered)."""
        vm, book = live.vm, live.logbook
        if vm is None or book is None:
            return
        book.redactor = live.redactor
        vm.console(lambda data: book.add("console", data))
        proclog.install(self, live, fresh=fresh)

    def proc_exited(self, live: Live, proc: object, exit_code: object, sig: object) -> str | None:
        """Record the exit of a process the service started, once (the guest's word is not
        trusted to name other processes, nor to repeat an exit: it cannot flood the log)."""
        if not isinstance(proc, int) or proc not in live.procs:
            return None
        if live.procs[proc] is None:
            with audit_log.on_own():  # mvmd saw it end, whoever asked (the tenant's chain)
                live.procs[proc] = audit_after(
                    "proc.exited",
                    live.name,
                    proc=proc,
                    exit_code=exit_code if isinstance(exit_code, int) else None,
                    signal=sig if isinstance(sig, int) else None,
                )
        return live.procs[proc]

    # -- teardown -------------------------------------------------------------------------
    async def teardown(self, live: Live) -> None:
        await self.close_egress(live)
        if live.vm is not None:
            await live.vm.destroy()
            live.vm = None
        else:
            run_dir = Path(live.rec.run_dir)
            if live.rec.pid is not None:
                from mvm.vmm.qemu import is_qemu_for

                if is_qemu_for(live.rec.pid, run_dir):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(live.rec.pid, 9)
        if live.logbook is not None:
            live.logbook.close()
            live.logbook = None
        shutil.rmtree(live.rec.run_dir, ignore_errors=True)

    async def fail(self, live: Live, reason: str) -> None:
        """Mark a sandbox failed with ``reason`` and release its QEMU, sockets and files."""
        if live.rec.state not in state.LIVE_STATES:
            return  # already stopped or failed
        log.warning("sandbox %s failed: %s", live.name, reason)
        live.note(f"failed: {reason}")
        await self.forwards.remove_all(live.rec.id)
        live.forwards = []
        postmortem.keep_log(live.logbook, live.rec)  # `logs` answers until it is removed
        live.logbook = None
        await self.teardown(live)
        live.logbook = postmortem.kept_book(live.rec)
        live.rec = self.db.transition(live.rec, state.FAILED, reason=reason[:2000], pid=None)
        with audit_log.on_own():
            live.audit_id = audit_after(
                "sandbox.failed", live.name, id=live.rec.id, **reason_fields(reason)
            )

    async def detach_all(self) -> None:
        """Stop serving (sandboxes keep running; a new mvmd reattaches)."""
        await self.forwards.close()
        for live in list(self.live.values()):
            await self.close_egress(live)  # a new mvmd listens again on the same path
            if live.vm is not None:
                with contextlib.suppress(MvmError, OSError):
                    await live.vm.detach()
            if live.logbook is not None:
                live.logbook.close()
