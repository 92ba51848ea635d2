"""Sandbox lifecycle: create, down, pause, resume, set-ttl, wait; reattach after an mvmd
restart; the TTL and liveness reaper.

Every transition goes through ``StateDB.transition`` (written before it is acted on),
so a daemon killed at any point finds on restart what it was doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import msgspec

from mvm import names, state
from mvm.agent.client import check_limits
from mvm.api import models as M
from mvm.daemon import reaping
from mvm.daemon.egress import policy_for, proxy_env
from mvm.daemon.forwards import check_spec
from mvm.daemon.logbook import LogBook
from mvm.errors import (
    InvalidArgument,
    MvmError,
    SandboxExists,
    SandboxStateError,
    VMError,
)
from mvm.policy import admission
from mvm.service import postmortem
from mvm.service.core import Core, new_record, spec_for
from mvm.service.health import Health
from mvm.service.live import ACTOR, Live, audit_after, info, reason_fields
from mvm.service.pool import Pool
from mvm.service.ports import Ports
from mvm.state import SandboxRecord
from mvm.vm import BOOT_TIMEOUT, MicroVM, VMSpec, new_id
from mvm.vmm.qemu import is_qemu_for

log = logging.getLogger(__name__)

#: How often the reaper checks TTLs and QEMU liveness (seconds).
REAP_INTERVAL = 1.0


class Sandboxes:
    def __init__(self, core: Core, ports: Ports) -> None:
        self.core = core
        self.ports = ports
        self._reaper: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None
        #: Waiting VMs for creates (set by the service; None: every create boots).
        self.pool: Pool | None = None
        #: Set once every recorded sandbox is reattached (or failed).
        self.ready = asyncio.Event()

    # -- startup / shutdown -----------------------------------------------------------
    async def start(self) -> None:
        # All at once: a guest that stalls its handshake (up to attach's timeout) must
        # not delay the other sandboxes once per sandbox.
        await asyncio.gather(*(self._reattach(rec) for rec in self.core.db.all()))
        for live in list(self.core.live.values()):
            await self.ports.restore(live)
        self._reaper = asyncio.create_task(self._reap_forever())
        self._health = asyncio.create_task(Health(self.core).run_forever())
        self.ready.set()

    async def close(self) -> None:
        """Stop serving (sandboxes keep running; a new mvmd reattaches)."""
        for task in (self._reaper, self._health):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self.core.detach_all()

    async def _reattach(self, rec: SandboxRecord) -> None:
        core = self.core
        live = Live(rec)
        core.live[rec.name] = live
        if rec.state not in (state.RUNNING, state.PAUSED) or rec.pid is None:
            if rec.state in state.LIVE_STATES:  # died half-way through a transition
                await core.fail(live, f"mvmd stopped while the sandbox was {rec.state}")
            live.logbook = postmortem.kept_book(rec)
            return
        live.logbook = LogBook(Path(rec.run_dir) / "events.jsonl")
        if not is_qemu_for(rec.pid, Path(rec.run_dir)):
            await core.fail(
                live,
                f"QEMU (pid {rec.pid}) vanished while mvmd was down; "
                "its exit status went to the mvmd that started it",
            )
            return
        with contextlib.suppress(MvmError):  # a removed secret: nothing left to redact
            core.resolve_secrets(live, rec.secret_env)
        try:
            image = core.image_for(rec)
            network = await core.start_egress(live)
            live.vm = await MicroVM.attach(
                rec.id,
                spec_for(rec, image, network),
                store=core.store,
                run_dir=Path(rec.run_dir),
                pid=rec.pid,
                paused=rec.state == state.PAUSED,
            )
            live.note("mvmd reattached")
            core.wire(live, fresh=False)  # recovers what the guest wrote meanwhile
        except (MvmError, OSError) as exc:
            await core.fail(live, f"lost while mvmd was down: {exc}")

    def list_all(self) -> list[M.SandboxInfo]:
        return [info(live) for live in sorted(self.core.live.values(), key=lambda x: x.name)]

    # -- lifecycle ------------------------------------------------------------------------
    async def create(self, req: M.CreateSandbox) -> Live:
        core = self.core
        vm_id = new_id()
        name = names.check("sandbox", req.name) if req.name is not None else vm_id
        plan = admission.plan_from_create(req)
        plan = dataclasses.replace(plan, mounts=tuple(os.path.realpath(m) for m in plan.mounts))
        core.gate.launch(name, plan)  # before anything boots
        core.gate.uploads(name, [os.path.realpath(p) for p in req.uploads])
        M.check_shape(req)
        core.resolve_secrets(None, req.secret_env)  # unknown names fail before booting
        ports = [check_spec(p) for p in req.ports]  # refuse bad forwards before booting
        limits = check_limits(req.limits) if req.limits else None  # before booting
        netpolicy = await policy_for(req.network.preset, list(req.network.allow))
        disk_mb = req.disk_mb if req.disk_mb is not None else max(M.MIN_DISK_MB, req.memory_mb // 2)
        if disk_mb < M.MIN_DISK_MB:
            raise InvalidArgument(f"disk must be at least {M.MIN_DISK_MB} MiB")
        image = await asyncio.to_thread(core.store.ensure, req.image)
        shape = M.shape_fields(req) | {
            "image": image.name,
            "disk_mb": disk_mb,
            "env": {**image.env, **(proxy_env() if netpolicy.enabled else {}), **req.env},
        }
        rec = new_record(
            shape, vm_id=vm_id, name=name, image_id=image.id, ttl_seconds=req.ttl_seconds
        )
        if limits is not None:
            rec = msgspec.structs.replace(rec, limits=limits)
        live = await self.insert(rec)
        core.resolve_secrets(live, req.secret_env)
        async with live.lock:
            spec = spec_for(rec, image, netpolicy.enabled)
            try:
                # The proxy listens before QEMU starts: the guest's first connection finds it.
                await core.start_egress(live, netpolicy)
                vm = await self._pooled(live, spec) or await self._boot(spec, vm_id)
                if limits is not None:
                    await self._apply_limits(vm, limits)
            except BaseException as exc:
                await self.forget(live)
                audit_after("sandbox.failed", name, id=vm_id, **reason_fields(f"boot: {exc!r}"))
                if isinstance(exc, MvmError):
                    raise
                raise VMError(f"could not start {name}: {exc!r}") from exc
            self.serve(live, vm)
            live.note(f"started from {image.name} in {vm.boot_seconds:.2f}s")
            live.audit_id = audit_after(
                "sandbox.launched",
                name,
                id=vm_id,
                image=image.name,
                image_id=image.id,
                cpus=req.cpus,
                memory_mb=req.memory_mb,
                disk_mb=disk_mb,
                ttl_seconds=req.ttl_seconds,
                network=req.network.preset,
                network_allow=list(req.network.allow),
                ports=len(req.ports),
                env_keys=sorted(rec.env),
                secret_env_keys=sorted(req.secret_env),
                workload_id=req.workload_id,
                tags=dict(req.tags),
                boot_seconds=round(vm.boot_seconds, 3),
                **({"limits": limits} if limits is not None else {}),
                **({"oneshot": True} if ACTOR.get() != "mvmd" else {}),
            )
        try:
            for p in ports:
                await self.ports.add(name, p)
        except BaseException:
            with contextlib.suppress(MvmError):
                await self.down(name, reason="forward refused")
            raise
        return live

    async def _apply_limits(self, vm: MicroVM, limits: dict[str, int]) -> None:
        """Send the create's cgroup limits with a hello (the guest keeps them from then on);
        a VM whose agent does not take them is destroyed, not left running."""
        try:
            agent = vm.require_agent()
            agent.set_limits(**limits)
            await agent.hello(BOOT_TIMEOUT, alive=vm.qemu.alive)
        except BaseException:
            with contextlib.suppress(Exception):
                await vm.destroy()
            raise

    async def _pooled(self, live: Live, spec: VMSpec) -> MicroVM | None:
        """A waiting VM from the pool (``service.pool``), if it has one of this shape; the
        sandbox then lives in that VM's run directory."""
        if self.pool is None or spec.disks:  # a builder's disks are its own
            return None
        vm = await self.pool.take(spec, live.rec.id)
        if vm is not None:
            live.rec = self.core.db.update(live.rec, run_dir=str(vm.run_dir))
        return vm

    async def _boot(self, spec: VMSpec, vm_id: str) -> MicroVM:
        vm = await MicroVM.boot(spec, store=self.core.store, vm_id=vm_id)
        if self.pool is not None and not spec.disks:
            self.pool.booted(spec)  # its template may exist only now
        return vm

    async def insert(self, rec: SandboxRecord) -> Live:
        """Claim the name and record the sandbox as CREATING (one step)."""
        core = self.core
        async with core.create_lock:
            if rec.name in core.live:
                raise SandboxExists(
                    f"a sandbox named {rec.name!r} already exists",
                    hint=f"pick another name or `mvmctl down {rec.name}`",
                    sandbox=rec.name,
                )
            try:
                core.db.insert(rec)
            except sqlite3.IntegrityError:
                raise SandboxExists(
                    f"a sandbox named {rec.name!r} already exists", sandbox=rec.name
                ) from None
            live = Live(rec)
            core.live[rec.name] = live
        return live

    async def forget(self, live: Live) -> None:
        """Undo ``insert`` after a failed start."""
        await self.core.close_egress(live)
        self.core.db.delete(live.rec.id)
        self.core.live.pop(live.name, None)
        shutil.rmtree(live.rec.run_dir, ignore_errors=True)

    def serve(self, live: Live, vm: MicroVM) -> None:
        """A started VM becomes the sandbox's: logbook, wiring, RUNNING."""
        live.vm = vm
        live.logbook = LogBook(Path(live.rec.run_dir) / "events.jsonl")
        self.core.wire(live)
        live.rec = self.core.db.transition(live.rec, state.RUNNING, pid=vm.pid)

    async def down(self, name: str, *, reason: str = "down") -> M.SandboxInfo:
        core = self.core
        live = core.get(name)
        async with live.lock:
            if live.rec.state != state.STOPPING:
                live.rec = core.db.transition(live.rec, state.STOPPING)
            await core.forwards.remove_all(live.rec.id)
            live.forwards = []
            await core.teardown(live)
            live.rec = core.db.transition(live.rec, state.STOPPED)
            core.db.delete(live.rec.id)
            live.audit_id = audit_after(  # while it is known: routed to its tenant's chain
                "sandbox.stopped",
                live.name,
                id=live.rec.id,
                reason=reason,
                lived_seconds=round(time.time() - live.rec.created, 3),
            )
            core.live.pop(live.name, None)
            postmortem.discard(live.rec)
        return info(live)

    async def pause(self, name: str) -> Live:
        core = self.core
        live, _ = core.running(name)
        async with live.lock:
            assert live.vm is not None
            live.rec = core.db.transition(live.rec, state.PAUSED)
            await live.vm.pause()
            live.note("paused")
            live.audit_id = audit_after("sandbox.paused", live.name, id=live.rec.id)
        return live

    async def resume(self, name: str) -> Live:
        core = self.core
        live = core.get(name)
        if live.rec.state != state.PAUSED or live.vm is None:
            raise SandboxStateError(
                f"sandbox {name} is {live.rec.state}, not paused",
                sandbox=name,
                state=str(live.rec.state),
            )
        async with live.lock:
            await live.vm.resume()
            live.rec = core.db.transition(live.rec, state.RUNNING)
            if live.vm.agent is not None:
                with contextlib.suppress(MvmError):
                    await live.vm.agent.hello(5.0)  # the guest clock stood still: reset it
            live.note("resumed")
            live.audit_id = audit_after("sandbox.resumed", live.name, id=live.rec.id)
        return live

    def set_ttl(self, name: str, ttl: float) -> Live:
        live = self.core.get(name)
        M.check_shape(msgspec.structs.replace(live.rec, ttl_seconds=ttl))
        self.core.gate.ttl(live.name, ttl)
        live.rec = self.core.db.update(live.rec, ttl_seconds=ttl, expires_at=time.time() + ttl)
        live.audit_id = audit_after("sandbox.ttl_set", live.name, id=live.rec.id, ttl_seconds=ttl)
        return live

    async def wait(self, name: str, timeout: float) -> M.SandboxInfo:
        """Wait until the sandbox is gone or failed (bounded by ``timeout``)."""
        live = self.core.get(name)
        deadline = time.monotonic() + max(0.0, min(timeout, M.MAX_TTL))
        while time.monotonic() < deadline:
            if self.core.live.get(live.name) is not live or live.rec.state in (
                state.FAILED,
                state.STOPPED,
            ):
                break
            await asyncio.sleep(0.2)
        return info(live)

    # -- reaper -------------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                await self.reap_once()
            except Exception:  # the reaper must never die
                log.exception("reaper pass failed")

    async def reap_once(self) -> None:
        lives = list(self.core.live.values())
        expired = set(reaping.due((live.rec for live in lives), time.time()))
        for live in lives:
            rec = live.rec
            if rec.name in expired:
                log.info("sandbox %s reached its TTL", rec.name)
                with contextlib.suppress(MvmError):
                    await self.down(rec.name, reason="ttl")
                continue
            if rec.state in (state.RUNNING, state.PAUSED) and live.vm is not None:
                vm = live.vm
                if not live.lock.locked() and not vm.alive():
                    await asyncio.sleep(0.1)  # let the console pump catch the last lines
                    await self.core.fail(live, postmortem.exit_reason(vm))
                elif vm.agent is not None and vm.agent.failure is not None:
                    failure = vm.agent.failure
                    await asyncio.sleep(0.1)  # a dying QEMU closes its sockets before it exits
                    if vm.alive():
                        await self.core.fail(live, f"agent connection lost: {failure}")
                    else:
                        await self.core.fail(live, postmortem.exit_reason(vm))
