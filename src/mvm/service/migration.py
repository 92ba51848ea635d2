"""Live migration, one host's half of it: sending a running sandbox's QEMU to another
host's (``out``), or taking one in (``incoming`` then ``finish``).

The cluster front drives both halves (``mvm.cluster.migrate``): the source describes the
sandbox (``plan``); the destination admits it like a create (admission from the shape,
the same name and, when free, the same id), opens its egress proxy and starts a QEMU
listening for the TLS stream (``mvm.vmm.livemig``); the source migrates to it while its
guest runs; the destination resumes the guest, reconnects to its agent and serves it;
the source is removed (``commit``) or, when the destination failed, runs again
(``abort_out``). Audit records on both hosts say what moved where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import Path

import msgspec

from mvm import names, paths, tenancy
from mvm.api import migrate as G
from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError, PolicyDenied, SandboxStateError
from mvm.policy import admission
from mvm.service.core import Core, new_record, spec_for
from mvm.service.live import Live, audit_after, info
from mvm.service.sandboxes import Sandboxes
from mvm.vm import new_id
from mvm.vmm import livemig

log = logging.getLogger(__name__)
SANDBOX_ID = re.compile(r"sb-[0-9a-f]{10}")
#: Seconds an incoming migration may wait for its stream and ``finish``.
INCOMING_TTL = livemig.MIGRATE_TIMEOUT + 120.0


class Migration:
    def __init__(self, core: Core, sandboxes: Sandboxes) -> None:
        self.core = core
        self.sandboxes = sandboxes
        self._incoming: dict[str, tuple[Live, livemig.Incoming, G.MigrateIn]] = {}
        self._sent: set[str] = set()

    # -- source -------------------------------------------------------------------------
    def plan(self, name: str) -> G.MigrationPlan:
        live, _ = self.core.running(name)
        r = live.rec
        forwards = [
            M.PortSpec(guest_port=f.guest_port, host_port=f.host_port, host=f.host,
                       allow_wildcard=f.wildcard)
            for f in self.core.db.forwards(r.id)
        ]  # fmt: skip
        # Secret values stay on this host: the destination resolves names it knows itself.
        shape = M.shape_fields(r) | {"secret_env": {}, "ports": []}
        return G.MigrationPlan(
            **shape,  # type: ignore[arg-type]
            id=r.id,
            image_id=r.image_id,
            expires_at=r.expires_at,
            created=r.created,
            forwards=forwards,
            procs=sorted(p for p, done in live.procs.items() if done is None),
            tenant=r.tenant,
            token_id=r.token_id,
        )

    async def out(self, name: str, req: G.MigrateOut) -> G.MigrationStats:
        live, _ = self.core.running(name)
        async with live.lock:
            live, _ = self.core.running(name)
            assert live.vm is not None
            live.note(f"migrating to {req.to_host or 'another host'}")
            try:
                stats = await livemig.migrate_out(live.vm, req.uri, req.key)
            except MvmError as exc:
                live.note(f"migration failed, running here again: {exc}")
                audit_after("sandbox.migrate_failed", live.name, id=live.rec.id, to=req.to_host)
                raise
            self._sent.add(live.name)
        live.note(f"sent: stopped {stats['downtime_ms']} ms for the last pass")
        return G.MigrationStats(**stats)

    async def abort_out(self, name: str) -> M.SandboxInfo:
        """The destination failed after the stream went through: run the guest here again."""
        live = self.core.serving(name)
        async with live.lock:
            assert live.vm is not None
            await livemig.resume_source(live.vm)
            self._sent.discard(live.name)
            live.note("migration abandoned: running here again")
        audit_after("sandbox.migrate_failed", live.name, id=live.rec.id)
        return info(live)

    async def commit(self, name: str, to_host: str) -> M.SandboxInfo:
        """The destination runs it: remove it here (audited as migrated)."""
        live = self.core.get(name)
        if live.name not in self._sent:
            raise SandboxStateError(f"{name} was not migrated from here", sandbox=name)
        self._sent.discard(live.name)
        return await self.sandboxes.down(
            live.name, reason=f"migrated to {to_host or 'another host'}"
        )

    # -- destination --------------------------------------------------------------------
    async def incoming(self, name: str, req: G.MigrateIn) -> G.Listening:
        core = self.core
        p = req.plan
        livemig.check_key(req.key)
        if not SANDBOX_ID.fullmatch(p.id):
            raise InvalidArgument("a migration plan's id must be a sandbox id (sb-<10 hex>)")
        if p.tenant is not None:
            names.check("tenant", p.tenant)
        if p.token_id is not None:
            names.check("token", p.token_id)
        shape = M.SandboxShape(**M.shape_fields(p))  # type: ignore[arg-type]
        core.gate.launch(name, admission.plan_from_shape(shape))  # as any create
        image = next((i for i in core.store.all() if i.id == p.image_id), None)
        if image is None:
            raise InvalidArgument(
                f"image {p.image} ({p.image_id}) is not on this host",
                hint="copy it here first (the cluster does, by content hash)",
            )
        taken = {lv.rec.id for lv in core.live.values()}
        vm_id = p.id if p.id not in taken and not (paths.run_dir() / p.id).exists() else new_id()
        rec = new_record(
            M.shape_fields(shape),
            vm_id=vm_id,
            name=name,
            image_id=image.id,
            ttl_seconds=p.ttl_seconds,
        )
        if p.tenant is not None and not tenancy.owns(p.tenant, name):
            raise PolicyDenied(f"sandbox {name} is not in the namespace of tenant {p.tenant}")
        rec = msgspec.structs.replace(
            rec,
            tenant=p.tenant,
            token_id=p.token_id,
            expires_at=p.expires_at,
            created=p.created or rec.created,
        )
        live = await self.sandboxes.insert(rec)
        try:
            network = await core.start_egress(live)
            inc = await livemig.start_incoming(
                spec_for(rec, image, network), core.store, vm_id, Path(rec.run_dir),
                req.listen, req.key,
            )  # fmt: skip
        except BaseException:
            await self.sandboxes.forget(live)
            raise
        self._incoming[name] = (live, inc, req)
        # A front that vanished never finishes: the waiting QEMU and the name go.
        asyncio.get_running_loop().call_later(
            INCOMING_TTL, lambda: asyncio.ensure_future(self._expire(name, inc))
        )
        return G.Listening(id=vm_id, port=inc.port)

    async def finish(self, name: str) -> M.SandboxInfo:
        got = self._incoming.pop(name, None)
        if got is None:
            raise SandboxStateError(f"no migration of {name} is coming in", sandbox=name)
        live, inc, req = got
        t0 = time.monotonic()
        async with live.lock:
            try:
                vm = await livemig.finish_incoming(inc)
            except BaseException:
                await self.sandboxes.forget(live)
                raise
            self.sandboxes.serve(live, vm)
            for proc in req.plan.procs:  # processes started on the source: exits audited here
                live.procs[proc] = None
                if live.proclog is not None:
                    live.proclog.start(proc)
            live.note(f"migrated in from {req.source_host or 'another host'}")
        live.audit_id = audit_after(
            "sandbox.migrated_in",
            live.name,
            id=live.rec.id,
            source_id=req.plan.id,
            source_host=req.source_host,
            image=req.plan.image,
            image_id=req.plan.image_id,
            procs=len(req.plan.procs),
            resume_seconds=round(time.monotonic() - t0, 3),
        )
        return info(live)

    async def _expire(self, name: str, inc: livemig.Incoming) -> None:
        got = self._incoming.get(name)
        if got is not None and got[1] is inc:
            log.warning("incoming migration of %s never finished: dropped", name)
            await self.abort_in(name)

    async def abort_in(self, name: str) -> None:
        got = self._incoming.pop(name, None)
        if got is None:
            return
        live, inc, _ = got
        with contextlib.suppress(MvmError, OSError):
            await livemig.abort_incoming(inc)
        await self.sandboxes.forget(live)

    def placed(self, name: str, req: G.Placed) -> str | None:
        """The cluster front placed ``name`` here: its ``cluster.place`` record, written by
        this host's mvmd in the sandbox's chain like every other record about it."""
        live = self.core.get(name)
        return audit_after(
            "cluster.place",
            live.name,
            id=live.rec.id,
            host=req.host,
            shape=req.shape,
            policy=req.policy,
            failed=[{"host": f.host, "error": f.error[:200]} for f in req.failed[:16]],
        )
