"""The sandbox manager: named sandboxes, their state machine, reattach, TTL reaper, health.

Every transition is written to SQLite before it is acted on. QEMU runs detached
and serves its own sockets, so when mvmd restarts, ``start()`` reattaches to
every sandbox that was running (adopting its QEMU by pid after checking its
command line) and marks failed those whose QEMU is gone, cleaning their files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from mvm import audit, paths, redact, state
from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.api import models as M
from mvm.daemon.egress import EgressProxy, Verdict, policy_for, proxy_env
from mvm.daemon.forwards import Forwards, check_spec
from mvm.daemon.logbook import LogBook
from mvm.errors import (
    InvalidArgument,
    MvmError,
    SandboxExists,
    SandboxNotFound,
    SandboxStateError,
    SnapshotExists,
    SnapshotNotFound,
    VMError,
)
from mvm.images.store import Image, ImageStore
from mvm.policy import admission
from mvm.policy.network import Policy as NetPolicy
from mvm.secrets import SecretStore
from mvm.state import SandboxRecord, SnapshotRecord, StateDB
from mvm.vm import MicroVM, VMSpec, base_config, new_id
from mvm.vmm.qmp import Qmp

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: How often the reaper checks TTLs and QEMU liveness (seconds).
REAP_INTERVAL = 1.0
MIN_DISK_MB = 16
#: Bounds on the caller's labels (workload_id, tags).
MAX_TAGS = 32
MAX_LABEL = 256


@dataclass
class Live:
    """A sandbox the daemon is serving."""

    rec: SandboxRecord
    vm: MicroVM | None = None
    logbook: LogBook | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    forwards: list[M.ForwardInfo] = field(default_factory=list)
    #: Audit id of the last lifecycle record (launched, paused, ...): goes into SandboxInfo.
    audit_id: str | None = None
    #: Background processes mvmd started here -> audit id of their exit record (None: running).
    procs: dict[int, str | None] = field(default_factory=dict)
    #: Knows every secret value injected here: output and log lines pass through it.
    redactor: redact.Redactor = field(default_factory=redact.Redactor)
    #: The sandbox's egress proxy (None: no network).
    egress: EgressProxy | None = None

    @property
    def name(self) -> str:
        return self.rec.name


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
        network=M.NetworkSpec(preset=r.network_preset, allow=list(r.network_allow)),
        workload_id=r.workload_id,
        tags=dict(r.tags),
    )


def check_name(name: str, what: str = "sandbox") -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}",
            hint="use lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)",
        )


def check_labels(workload_id: str | None, tags: dict[str, str]) -> None:
    """Labels are the caller's, stored and returned as given: bound them."""
    if workload_id is not None and not 0 < len(workload_id) <= MAX_LABEL:
        raise InvalidArgument(f"workload_id must be 1 to {MAX_LABEL} characters")
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"at most {MAX_TAGS} tags (got {len(tags)})")
    for k, v in tags.items():
        if not 0 < len(k) <= MAX_LABEL or len(v) > MAX_LABEL:
            raise InvalidArgument(
                f"tag {k[:40]!r}: keys must be 1 to {MAX_LABEL} characters, values at most {MAX_LABEL}"
            )


def check_ttl(ttl: float) -> None:
    if not 0 < ttl <= M.MAX_TTL:
        raise InvalidArgument(f"TTL must be between 0 and {M.MAX_TTL:.0f} seconds (got {ttl:g})")


def audit_after(event: str, sandbox: str | None, **fields: Any) -> str | None:
    """Audit something that already happened: a failing log is logged, not raised, so the
    caller's result is not lost. (Records made *before* acting use ``audit.record`` and fail
    closed.)"""
    try:
        return audit.record(event, sandbox=sandbox, **fields)
    except MvmError as exc:
        log.error("audit record %s for %s failed: %s", event, sandbox, exc)
        return None


def reason_fields(reason: str) -> dict[str, Any]:
    """A failure reason for the audit log: its first clause (mvm's own words) and a hash
    (the rest may quote guest console output)."""
    return {
        "reason": reason.split(":", 1)[0][:120],
        "reason_sha256": audit.sha256_hex(reason.encode()),
    }


def snapshots_dir() -> Path:
    return paths.home() / "snapshots"


class Manager:
    def __init__(self, db: StateDB, store: ImageStore | None = None) -> None:
        self.db = db
        self.store = store or ImageStore()
        self.live: dict[str, Live] = {}
        self._create_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        #: Set once every recorded sandbox is reattached (or failed): until then the API
        #: answers only ``status``.
        self.ready = asyncio.Event()
        self.forwards = Forwards(db, lambda sandbox_id: self.running(sandbox_id)[1])
        self.secrets = SecretStore()

    # -- startup / shutdown -----------------------------------------------------------
    async def start(self) -> None:
        # All at once: a guest that stalls its handshake (up to attach's timeout) must
        # not delay the other sandboxes once per sandbox. The socket is already served
        # (status only) while this runs: see server.Api.ready_middleware.
        await asyncio.gather(*(self._reattach(rec) for rec in self.db.all()))
        for live in list(self.live.values()):
            await self._restore_forwards(live)
        self._reaper = asyncio.create_task(self._reap_forever())
        self.ready.set()

    async def close(self) -> None:
        """Stop serving (sandboxes keep running; a new mvmd reattaches)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        await self.forwards.close()
        for live in list(self.live.values()):
            if live.egress is not None:  # a new mvmd listens again on the same path
                await live.egress.close()
                live.egress = None
            if live.vm is not None:
                if live.vm.agent is not None:
                    await live.vm.agent.close()
                await live.vm.qemu.stop_capture()
            if live.logbook is not None:
                live.logbook.close()

    async def _reattach(self, rec: SandboxRecord) -> None:
        live = Live(rec)
        self.live[rec.name] = live
        if rec.state not in (state.RUNNING, state.PAUSED) or rec.pid is None:
            if rec.state in state.LIVE_STATES:  # died half-way through a transition
                await self._fail(live, f"mvmd stopped while the sandbox was {rec.state}")
            return
        live.logbook = LogBook(Path(rec.run_dir) / "events.jsonl")
        with contextlib.suppress(MvmError):  # a removed secret: nothing left to redact
            self.resolve_secrets(live, rec.secret_env)
        try:
            image = self._image_for(rec)
            network = await self._start_egress(live, rec.network_preset, rec.network_allow)
            spec = spec_for(rec, image, network)
            cfg = base_config(spec, self.store, Path(rec.run_dir))
            if rec.state == state.PAUSED:
                async with Qmp(cfg.qmp_socket) as qmp:
                    await qmp.execute("cont")  # the handshake needs a running guest
            live.vm = await MicroVM.attach(rec.id, spec, cfg, rec.pid)
            if rec.state == state.PAUSED:
                async with Qmp(cfg.qmp_socket) as qmp:
                    await qmp.execute("stop")
            self._wire(live)
            live.logbook.note("mvmd reattached")
        except (MvmError, OSError) as exc:
            await self._fail(live, f"lost while mvmd was down: {exc}")

    def _image_for(self, rec: SandboxRecord) -> Image:
        image = self.store.find(rec.image)
        if image is None or image.id != rec.image_id:
            # The name now points at a rebuilt image; the sandbox keeps what it booted.
            for img in self.store.all():
                if img.id == rec.image_id:
                    return img
            if image is None:
                raise SandboxStateError(f"image {rec.image} of {rec.name} is gone")
        return image

    def _wire(self, live: Live) -> None:
        """Route console output and guest events into the sandbox's log."""
        vm, book = live.vm, live.logbook
        if vm is None or book is None:
            return
        book.redactor = live.redactor
        vm.qemu.console_listener = lambda data: book.add("console", data)
        if vm.agent is not None:
            agent = vm.agent

            def on_event(frame: P.Frame) -> None:
                h = frame.header
                if h.get("kind") == "proc.output" and h.get("stream") in ("stdout", "stderr"):
                    book.add(f"proc:{h.get('proc')}:{h.get('stream')}", frame.payload)
                elif h.get("kind") == "proc.exit":
                    book.note(f"proc {h.get('proc')} exited with {h.get('exit_code')}")
                    self.proc_exited(live, h.get("proc"), h.get("exit_code"), h.get("signal"))

            agent.on_event = on_event

    def proc_started(
        self, live: Live, proc: int, argv: list[str], env_keys: list[str]
    ) -> str | None:
        live.procs[proc] = None
        return audit_after(
            "proc.started",
            live.name,
            proc=proc,
            argv_sha256=audit.argv_sha256(argv),
            argc=len(argv),
            env_keys=sorted(env_keys),
        )

    def proc_exited(self, live: Live, proc: object, exit_code: object, sig: object) -> str | None:
        """Record the exit of a process mvmd started, once (the guest's word is not trusted to
        name other processes, nor to repeat an exit: it cannot flood the log)."""
        if not isinstance(proc, int) or proc not in live.procs:
            return None
        if live.procs[proc] is None:
            live.procs[proc] = audit_after(
                "proc.exited",
                live.name,
                proc=proc,
                exit_code=exit_code if isinstance(exit_code, int) else None,
                signal=sig if isinstance(sig, int) else None,
            )
        return live.procs[proc]

    # -- secrets and admission ------------------------------------------------------------
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

    def exec_env(
        self, live: Live, env: Mapping[str, str], refs: Mapping[str, str]
    ) -> dict[str, str]:
        """The environment of one process: the sandbox's, the call's, then its secrets (only
        this process gets the values; the sandbox record keeps names)."""
        secret_values = self.resolve_secrets(live, {**live.rec.secret_env, **refs})
        return {**live.rec.env, **env, **secret_values}

    def admit(self, name: str, req: M.CreateSandbox) -> admission.Decision:
        """Run a launch through admission and audit the decision; a no raises PolicyDenied."""
        plan = admission.plan_from_create(req)
        plan = replace(plan, mounts=tuple(os.path.realpath(m) for m in plan.mounts))
        decision = admission.admit(plan, admission.load_policy())
        fields: dict[str, Any] = {
            "image": plan.image,
            "rules": [d.rule for d in decision.denials],
            "denials": [d.message for d in decision.denials],
            "notes": list(decision.notes),
            "secrets": list(plan.secrets),
        }
        if not decision.allowed:
            audit_after("plan.denied", name, **fields)
            raise admission.denied_error(decision)
        audit.record("plan.admitted", sandbox=name, **fields)  # fail closed
        return decision

    # -- lookup -------------------------------------------------------------------------
    def get(self, name: str) -> Live:
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
                f"sandbox {name} is paused", hint=f"resume it: mvmctl resume {name}", sandbox=name
            )
        if live.rec.state != state.RUNNING or live.vm is None:
            reason = f": {live.rec.reason}" if live.rec.reason else ""
            raise SandboxStateError(
                f"sandbox {name} is {live.rec.state}{reason}", sandbox=name, state=live.rec.state
            )
        return live, live.vm.require_agent()

    def list_all(self) -> list[M.SandboxInfo]:
        return [info(live) for live in sorted(self.live.values(), key=lambda x: x.name)]

    # -- lifecycle ------------------------------------------------------------------------
    async def create(self, req: M.CreateSandbox) -> Live:
        name = req.name or new_id()
        check_name(name)
        self.admit(name, req)  # before anything boots
        check_ttl(req.ttl_seconds)
        check_labels(req.workload_id, req.tags)
        self.resolve_secrets(None, req.secret_env)  # unknown names fail before booting
        ports = [check_spec(p) for p in req.ports]  # refuse bad forwards before booting
        netpolicy = await policy_for(req.network.preset, list(req.network.allow))
        disk_mb = req.disk_mb if req.disk_mb is not None else max(MIN_DISK_MB, req.memory_mb // 2)
        if disk_mb < MIN_DISK_MB:
            raise InvalidArgument(f"disk must be at least {MIN_DISK_MB} MiB")
        image = await asyncio.to_thread(self.store.ensure, req.image)
        vm_id = new_id()
        now = time.time()
        rec = SandboxRecord(
            id=vm_id,
            name=name,
            image=image.name,
            image_id=image.id,
            state=state.CREATING,
            cpus=req.cpus,
            memory_mb=req.memory_mb,
            disk_mb=disk_mb,
            env={**image.env, **(proxy_env() if netpolicy.enabled else {}), **req.env},
            secret_env=dict(req.secret_env),
            created=now,
            ttl_seconds=req.ttl_seconds,
            expires_at=now + req.ttl_seconds,
            run_dir=str(paths.run_dir() / vm_id),
            network_preset=req.network.preset,
            network_allow=list(req.network.allow),
            workload_id=req.workload_id,
            tags=dict(req.tags),
        )
        async with self._create_lock:  # name check + insert are one step
            if name in self.live:
                raise SandboxExists(
                    f"a sandbox named {name!r} already exists",
                    hint=f"pick another name or `mvmctl down {name}`",
                    sandbox=name,
                )
            try:
                self.db.insert(rec)
            except sqlite3.IntegrityError:
                raise SandboxExists(
                    f"a sandbox named {name!r} already exists", sandbox=name
                ) from None
            live = Live(rec)
            self.resolve_secrets(live, req.secret_env)
            self.live[name] = live
        async with live.lock:
            spec = spec_for(rec, image, netpolicy.enabled)
            try:
                # The proxy listens before QEMU starts: the guest's first connection finds it.
                await self._start_egress(live, rec.network_preset, rec.network_allow, netpolicy)
                vm = await MicroVM.boot(spec, store=self.store, vm_id=vm_id)
            except BaseException as exc:
                if live.egress is not None:
                    await live.egress.close()
                    live.egress = None
                self.db.delete(rec.id)
                self.live.pop(name, None)
                shutil.rmtree(rec.run_dir, ignore_errors=True)
                audit_after("sandbox.failed", name, id=vm_id, **reason_fields(f"boot: {exc!r}"))
                if isinstance(exc, MvmError):
                    raise
                raise VMError(f"could not start {name}: {exc!r}") from exc
            live.vm = vm
            live.logbook = LogBook(Path(rec.run_dir) / "events.jsonl")
            self._wire(live)
            live.rec = self.db.transition(replace_rec(rec, pid=vm.qemu.pid), state.RUNNING)
            live.logbook.note(f"started from {image.name} in {vm.boot_seconds:.2f}s")
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
                network_allow=len(req.network.allow),
                ports=len(req.ports),
                env_keys=sorted(rec.env),
                secret_env_keys=sorted(req.secret_env),
                workload_id=req.workload_id,
                tags=dict(req.tags),
                boot_seconds=round(vm.boot_seconds, 3),
            )
        try:
            for p in ports:
                await self.forward_add(name, p)
        except BaseException:
            with contextlib.suppress(MvmError):
                await self.down(name, reason="forward refused")
            raise
        return live

    async def down(self, name: str, *, reason: str = "down") -> M.SandboxInfo:
        live = self.get(name)
        async with live.lock:
            if live.rec.state != state.STOPPING:
                live.rec = self.db.transition(live.rec, state.STOPPING)
            await self.forwards.remove_all(live.rec.id)
            live.forwards = []
            await self._teardown(live)
            live.rec = replace_rec(live.rec, state=state.STOPPED)
            self.db.delete(live.rec.id)
            self.live.pop(live.name, None)
            live.audit_id = audit_after(
                "sandbox.stopped",
                live.name,
                id=live.rec.id,
                reason=reason,
                lived_seconds=round(time.time() - live.rec.created, 3),
            )
        return info(live)

    async def _start_egress(
        self, live: Live, preset: str, allow: list[str], policy: NetPolicy | None = None
    ) -> bool:
        """Open the sandbox's egress proxy on ``<run dir>/egress.sock`` if its policy has a
        network (also after an mvmd restart: same path). Returns whether it has one."""
        pol = policy if policy is not None else await policy_for(preset, allow)
        if not pol.enabled:
            return False

        def note(v: Verdict) -> None:
            if live.logbook is not None:
                what = "allowed" if v.allowed else f"denied ({v.rule}: {v.reason})"
                live.logbook.note(f"egress {v.host}:{v.port} {what}")

        live.egress = EgressProxy(
            live.name, pol, Path(live.rec.run_dir) / "egress.sock", on_decision=note
        )
        await live.egress.start()
        return True

    async def _teardown(self, live: Live) -> None:
        if live.egress is not None:
            await live.egress.close()
            live.egress = None
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

    async def _fail(self, live: Live, reason: str) -> None:
        """Mark a sandbox failed with ``reason`` and release its QEMU, sockets and files."""
        log.warning("sandbox %s failed: %s", live.name, reason)
        if live.logbook is not None:
            live.logbook.note(f"failed: {reason}")
        await self.forwards.remove_all(live.rec.id)
        live.forwards = []
        await self._teardown(live)
        rec = replace_rec(live.rec, state=state.FAILED, reason=reason[:2000], pid=None)
        self.db.save(rec)
        live.rec = rec
        live.audit_id = audit_after("sandbox.failed", live.name, id=rec.id, **reason_fields(reason))

    async def pause(self, name: str) -> Live:
        live, _ = self.running(name)
        async with live.lock:
            assert live.vm is not None
            live.rec = self.db.transition(live.rec, state.PAUSED)
            async with Qmp(live.vm.qemu.cfg.qmp_socket) as qmp:
                await qmp.execute("stop")
            if live.logbook:
                live.logbook.note("paused")
            live.audit_id = audit_after("sandbox.paused", live.name, id=live.rec.id)
        return live

    async def resume(self, name: str) -> Live:
        live = self.get(name)
        if live.rec.state != state.PAUSED or live.vm is None:
            raise SandboxStateError(f"sandbox {name} is {live.rec.state}, not paused", sandbox=name)
        async with live.lock:
            async with Qmp(live.vm.qemu.cfg.qmp_socket) as qmp:
                await qmp.execute("cont")
            live.rec = self.db.transition(live.rec, state.RUNNING)
            if live.vm.agent is not None:
                with contextlib.suppress(MvmError):
                    await live.vm.agent.hello(5.0)  # the guest clock stood still: reset it
            if live.logbook:
                live.logbook.note("resumed")
            live.audit_id = audit_after("sandbox.resumed", live.name, id=live.rec.id)
        return live

    def set_ttl(self, name: str, ttl: float) -> Live:
        check_ttl(ttl)
        live = self.get(name)
        live.rec = replace_rec(live.rec, ttl_seconds=ttl, expires_at=time.time() + ttl)
        self.db.save(live.rec)
        return live

    async def wait(self, name: str, timeout: float) -> M.SandboxInfo:
        """Wait until the sandbox is gone or failed (bounded by ``timeout``)."""
        live = self.get(name)
        deadline = time.monotonic() + max(0.0, min(timeout, M.MAX_TTL))
        while time.monotonic() < deadline:
            if self.live.get(name) is not live or live.rec.state in (state.FAILED, state.STOPPED):
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
        now = time.time()
        for live in list(self.live.values()):
            rec = live.rec
            if rec.state in (state.RUNNING, state.PAUSED) and rec.expires_at <= now:
                log.info("sandbox %s reached its TTL", rec.name)
                with contextlib.suppress(MvmError):
                    await self.down(rec.name, reason="ttl")
                continue
            if rec.state in (state.RUNNING, state.PAUSED) and live.vm is not None:
                if not live.lock.locked() and not live.vm.qemu.alive():
                    await asyncio.sleep(0.1)  # let the console pump catch the last lines
                    reason = live.vm.qemu.boot_failure()
                    await self._fail(live, f"QEMU exited: {reason}")
                elif live.vm.agent is not None and live.vm.agent.failure is not None:
                    await self._fail(live, f"agent connection lost: {live.vm.agent.failure}")

    # -- port forwards -------------------------------------------------------------------
    async def forward_add(self, name: str, spec: M.PortSpec) -> M.ForwardInfo:
        live = self.get(name)
        if live.rec.state not in (state.RUNNING, state.PAUSED) or live.vm is None:
            raise SandboxStateError(
                f"sandbox {name} is {live.rec.state}", sandbox=name, state=live.rec.state
            )
        fwd = await self.forwards.add(live.rec.id, live.name, spec)
        live.forwards = self.forwards.infos(live.rec.id)
        if live.logbook:
            live.logbook.note(f"forward {fwd.host}:{fwd.host_port} -> guest port {fwd.guest_port}")
        return fwd

    def forward_list(self, name: str) -> list[M.ForwardInfo]:
        live = self.get(name)
        return self.forwards.infos(live.rec.id)

    async def forward_remove(self, name: str, forward_id: str) -> M.ForwardInfo:
        live = self.get(name)
        fwd = await self.forwards.remove(live.rec.id, forward_id)
        live.forwards = self.forwards.infos(live.rec.id)
        return fwd

    async def _restore_forwards(self, live: Live) -> None:
        """After a reattach: bind the sandbox's stored forwards again (or forget them)."""
        if live.rec.state not in (state.RUNNING, state.PAUSED) or live.vm is None:
            await self.forwards.remove_all(live.rec.id)
            return
        for problem in await self.forwards.restore(live.rec.id):
            log.warning("sandbox %s: %s", live.name, problem)
            if live.logbook:
                live.logbook.note(problem)
        live.forwards = self.forwards.infos(live.rec.id)

    # -- exec and files -------------------------------------------------------------------
    async def exec_stream(self, name: str, req: M.ExecRequest) -> AsyncIterator[M.ExecEvent]:
        live, agent = self.running(name)
        env = self.exec_env(live, req.env, req.secret_env)
        redactors = {"stdout": live.redactor.stream(), "stderr": live.redactor.stream()}
        # Fail closed: no audit record, no exec. Output is hashed as it streams by.
        audit.record(
            "cmd.exec.started",
            sandbox=live.name,
            argv_sha256=audit.argv_sha256(req.argv),
            argc=len(req.argv),
            env_keys=sorted(env),
            secret_env_keys=sorted(req.secret_env),
            cwd=req.cwd,
            user=req.user,
            timeout=req.timeout,
            stdin_bytes=len(req.stdin),
            stdin_sha256=audit.sha256_hex(req.stdin),
        )
        digests = {"stdout": hashlib.sha256(), "stderr": hashlib.sha256()}
        sizes = {"stdout": 0, "stderr": 0}
        received = {"stdout": 0, "stderr": 0}  # raw bytes from the guest, per stream
        t0 = time.monotonic()
        finished = False

        def outputs() -> dict[str, Any]:
            return {
                f"{s}_{k}": v
                for s in ("stdout", "stderr")
                for k, v in (("sha256", digests[s].hexdigest()), ("bytes", sizes[s]))
            }

        try:
            async for frame in agent.exec_stream(
                req.argv,
                env=env,
                cwd=req.cwd,
                user=req.user,
                stdin=req.stdin,
                timeout=req.timeout,
                output_limit=req.output_limit,
            ):
                if frame.type == P.OUT:
                    stream = frame.header.get("stream")
                    if stream in ("stdout", "stderr"):
                        # The guest's word on output_limit is not trusted: cap it here too.
                        room = max(0, req.output_limit - received[str(stream)])
                        received[str(stream)] += len(frame.payload)
                        payload = frame.payload[:room]
                        # Redacted before it is hashed or leaves: audit sees what clients see.
                        data = redactors[str(stream)].feed(payload) if payload else b""
                        if data:
                            ev = M.ExecEvent(type=str(stream), data=data)
                            digests[ev.type].update(ev.data)
                            sizes[ev.type] += len(ev.data)
                            yield ev
                elif frame.type == P.OK:
                    for s_name, sr in redactors.items():
                        tail = sr.flush()
                        if tail:
                            digests[s_name].update(tail)
                            sizes[s_name] += len(tail)
                            yield M.ExecEvent(type=s_name, data=tail)
                    from mvm.agent.client import ExecReply, _convert

                    reply: ExecReply = _convert(frame, ExecReply, "exec")
                    finished = True
                    cut = {k: v > req.output_limit for k, v in received.items()}
                    aid = audit_after(
                        "cmd.exec.finished",
                        live.name,
                        exit_code=reply.exit_code,
                        timed_out=reply.timed_out,
                        signal=reply.signal,
                        # The guest's number: a NaN/inf must not make the record unwritable.
                        duration=(
                            round(reply.duration, 6) if math.isfinite(reply.duration) else None
                        ),
                        truncated_stdout=reply.truncated.stdout or cut["stdout"],
                        truncated_stderr=reply.truncated.stderr or cut["stderr"],
                        **outputs(),
                    )
                    yield M.ExecEvent(
                        type="exit",
                        exit_code=reply.exit_code,
                        timed_out=reply.timed_out,
                        signal=reply.signal,
                        duration=reply.duration,
                        truncated_stdout=reply.truncated.stdout or cut["stdout"],
                        truncated_stderr=reply.truncated.stderr or cut["stderr"],
                        audit_id=aid,
                    )
        finally:
            if not finished:  # error, or the client went away: still close the pair
                audit_after(
                    "cmd.exec.finished",
                    live.name,
                    exit_code=None,
                    aborted=True,
                    duration=round(time.monotonic() - t0, 6),
                    **outputs(),
                )

    # -- snapshots ----------------------------------------------------------------------
    async def snapshot_save(self, name: str, snap: str) -> SnapshotRecord:
        check_name(snap, "snapshot")
        live = self.get(name)
        if live.rec.state not in (state.RUNNING, state.PAUSED) or live.vm is None:
            raise SandboxStateError(f"sandbox {name} is {live.rec.state}", sandbox=name)
        async with live.lock:  # the name check and the save are one step
            if self.db.snapshot(live.name, snap) is not None:
                raise SnapshotExists(
                    f"{name} already has a snapshot {snap!r}",
                    hint=f"remove it: mvmctl snapshot rm {name} {snap}",
                    sandbox=name,
                    snapshot=snap,
                )
            if live.rec.state not in (state.RUNNING, state.PAUSED) or live.vm is None:
                raise SandboxStateError(f"sandbox {name} is {live.rec.state}", sandbox=name)
            d = snapshots_dir() / live.name / snap
            tmp = d.with_name(f".tmp-{snap}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            was_running = live.rec.state == state.RUNNING
            try:
                async with Qmp(live.vm.qemu.cfg.qmp_socket) as qmp:
                    await qmp.save_state(tmp / "state")
                    if was_running:
                        await qmp.execute("cont")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
            r = live.rec
            snap_rec = SnapshotRecord(
                sandbox=r.name,
                name=snap,
                path=str(d),
                created=time.time(),
                size=(d / "state").stat().st_size,
                image=r.image,
                image_id=r.image_id,
                cpus=r.cpus,
                memory_mb=r.memory_mb,
                disk_mb=r.disk_mb,
                env=r.env,
                ttl_seconds=r.ttl_seconds,
                network_preset=r.network_preset,
                network_allow=list(r.network_allow),
            )
            (d / "snapshot.json").write_bytes(msgspec.json.encode(snap_rec))
            self.db.add_snapshot(snap_rec)
            if live.logbook:
                live.logbook.note(f"snapshot {snap} saved ({snap_rec.size} bytes)")
        return snap_rec

    def snapshot_list(self, name: str) -> list[SnapshotRecord]:
        snaps = self.db.snapshots(name)
        if not snaps and name not in self.live:
            raise SandboxNotFound(f"no sandbox or snapshots named {name!r}", sandbox=name)
        return snaps

    def _snapshot(self, name: str, snap: str) -> SnapshotRecord:
        rec = self.db.snapshot(name, snap)
        if rec is None or not (Path(rec.path) / "state").is_file():
            known = ", ".join(s.name for s in self.db.snapshots(name)) or "none"
            raise SnapshotNotFound(f"{name} has no snapshot {snap!r}", hint=f"snapshots: {known}")
        return rec

    async def snapshot_remove(self, name: str, snap: str) -> None:
        rec = self._snapshot(name, snap)
        self.db.remove_snapshot(name, snap)
        shutil.rmtree(rec.path, ignore_errors=True)

    async def snapshot_restore(self, name: str, snap: str) -> Live:
        """Put sandbox ``name`` back to the snapshot: its VM is replaced by one loaded from
        the saved state; if the sandbox was removed, it is created again."""
        srec = self._snapshot(name, snap)
        live = self.live.get(name)
        if live is None:
            return await self._recreate_from(srec)
        async with live.lock:
            if live.vm is None:
                raise SandboxStateError(f"sandbox {name} is {live.rec.state}", sandbox=name)
            live.rec = (
                self.db.transition(live.rec, state.RUNNING)
                if live.rec.state != state.RUNNING
                else live.rec
            )
            await live.vm.restore(Path(srec.path) / "state")
            self._wire(live)
            live.rec = replace_rec(live.rec, pid=live.vm.qemu.pid)
            self.db.save(live.rec)
            if live.logbook:
                live.logbook.note(f"restored snapshot {snap}")
        return live

    async def _recreate_from(self, srec: SnapshotRecord) -> Live:
        image = self._image_for_snapshot(srec)
        vm_id = new_id()
        now = time.time()
        ttl = srec.ttl_seconds or M.DEFAULT_TTL
        rec = SandboxRecord(
            id=vm_id,
            name=srec.sandbox,
            image=srec.image,
            image_id=srec.image_id,
            state=state.CREATING,
            cpus=srec.cpus,
            memory_mb=srec.memory_mb,
            disk_mb=srec.disk_mb,
            env=dict(srec.env),
            created=now,
            ttl_seconds=ttl,
            expires_at=now + ttl,
            run_dir=str(paths.run_dir() / vm_id),
            network_preset=srec.network_preset,
            network_allow=list(srec.network_allow),
        )
        async with self._create_lock:
            if srec.sandbox in self.live:
                raise SandboxExists(f"a sandbox named {srec.sandbox!r} already exists")
            self.db.insert(rec)
            live = Live(rec)
            self.live[rec.name] = live
        async with live.lock:
            try:
                network = await self._start_egress(live, rec.network_preset, rec.network_allow)
                spec = spec_for(rec, image, network)
                cfg = replace(base_config(spec, self.store, Path(rec.run_dir)), incoming=True)
                vm = await MicroVM._start(
                    vm_id, spec, cfg, 120.0, restore=Path(srec.path) / "state"
                )
            except BaseException:
                if live.egress is not None:
                    await live.egress.close()
                    live.egress = None
                self.db.delete(rec.id)
                self.live.pop(rec.name, None)
                shutil.rmtree(rec.run_dir, ignore_errors=True)
                raise
            live.vm = vm
            live.logbook = LogBook(Path(rec.run_dir) / "events.jsonl")
            self._wire(live)
            live.rec = self.db.transition(replace_rec(rec, pid=vm.qemu.pid), state.RUNNING)
            live.logbook.note(f"created from snapshot {srec.name}")
        return live

    def _image_for_snapshot(self, srec: SnapshotRecord) -> Image:
        for img in self.store.all():
            if img.id == srec.image_id:
                return img
        raise SnapshotNotFound(
            f"the image {srec.image} that snapshot {srec.name} was taken from is gone"
        )


def spec_for(rec: SandboxRecord, image: Image, network: bool) -> VMSpec:
    """The VM shape a sandbox record asks for (the same on create, reattach and restore)."""
    return VMSpec(
        image,
        cpus=rec.cpus,
        memory_mb=rec.memory_mb,
        overlay_size=f"{rec.disk_mb}m",
        network=network,
    )


def replace_rec(rec: SandboxRecord, **changes: object) -> SandboxRecord:
    return msgspec.structs.replace(rec, **changes)


__all__ = ["Live", "Manager", "info", "replace"]
