"""The sandbox manager: named sandboxes, their state machine, reattach, TTL reaper, health.

Every transition is written to SQLite before it is acted on. QEMU runs detached
and serves its own sockets, so when mvmd restarts, ``start()`` reattaches to
every sandbox that was running (adopting its QEMU by pid after checking its
command line) and marks failed those whose QEMU is gone, cleaning their files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec

from mvm import paths, state
from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.api import models as M
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
from mvm.state import SandboxRecord, SnapshotRecord, StateDB
from mvm.vm import MicroVM, VMSpec, base_config, new_id
from mvm.vmm.qmp import Qmp

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: How often the reaper checks TTLs and QEMU liveness (seconds).
REAP_INTERVAL = 1.0
MIN_DISK_MB = 16


@dataclass
class Live:
    """A sandbox the daemon is serving."""

    rec: SandboxRecord
    vm: MicroVM | None = None
    logbook: LogBook | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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
    )


def check_name(name: str, what: str = "sandbox") -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}",
            hint="use lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)",
        )


def check_ttl(ttl: float) -> None:
    if not 0 < ttl <= M.MAX_TTL:
        raise InvalidArgument(f"TTL must be between 0 and {M.MAX_TTL:.0f} seconds (got {ttl:g})")


def snapshots_dir() -> Path:
    return paths.home() / "snapshots"


class Manager:
    def __init__(self, db: StateDB, store: ImageStore | None = None) -> None:
        self.db = db
        self.store = store or ImageStore()
        self.live: dict[str, Live] = {}
        self._create_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    # -- startup / shutdown -----------------------------------------------------------
    async def start(self) -> None:
        for rec in self.db.all():
            await self._reattach(rec)
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        """Stop serving (sandboxes keep running; a new mvmd reattaches)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        for live in list(self.live.values()):
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
        try:
            image = self._image_for(rec)
            spec = VMSpec(
                image, cpus=rec.cpus, memory_mb=rec.memory_mb, overlay_size=f"{rec.disk_mb}m"
            )
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
        vm.qemu.console_listener = lambda data: book.add("console", data)
        if vm.agent is not None:
            agent = vm.agent

            def on_event(frame: P.Frame) -> None:
                h = frame.header
                if h.get("kind") == "proc.output" and h.get("stream") in ("stdout", "stderr"):
                    book.add(f"proc:{h.get('proc')}:{h.get('stream')}", frame.payload)
                elif h.get("kind") == "proc.exit":
                    book.note(f"proc {h.get('proc')} exited with {h.get('exit_code')}")

            agent.on_event = on_event

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
        check_ttl(req.ttl_seconds)
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
            env={**image.env, **req.env},
            created=now,
            ttl_seconds=req.ttl_seconds,
            expires_at=now + req.ttl_seconds,
            run_dir=str(paths.run_dir() / vm_id),
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
            self.live[name] = live
        async with live.lock:
            spec = VMSpec(image, cpus=req.cpus, memory_mb=req.memory_mb, overlay_size=f"{disk_mb}m")
            try:
                vm = await MicroVM.boot(spec, store=self.store, vm_id=vm_id)
            except BaseException as exc:
                self.db.delete(rec.id)
                self.live.pop(name, None)
                shutil.rmtree(rec.run_dir, ignore_errors=True)
                if isinstance(exc, MvmError):
                    raise
                raise VMError(f"could not start {name}: {exc!r}") from exc
            live.vm = vm
            live.logbook = LogBook(Path(rec.run_dir) / "events.jsonl")
            self._wire(live)
            live.rec = self.db.transition(replace_rec(rec, pid=vm.qemu.pid), state.RUNNING)
            live.logbook.note(f"started from {image.name} in {vm.boot_seconds:.2f}s")
        return live

    async def down(self, name: str) -> M.SandboxInfo:
        live = self.get(name)
        async with live.lock:
            if live.rec.state != state.STOPPING:
                live.rec = self.db.transition(live.rec, state.STOPPING)
            await self._teardown(live)
            live.rec = replace_rec(live.rec, state=state.STOPPED)
            self.db.delete(live.rec.id)
            self.live.pop(live.name, None)
        return info(live)

    async def _teardown(self, live: Live) -> None:
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
        await self._teardown(live)
        rec = replace_rec(live.rec, state=state.FAILED, reason=reason[:2000], pid=None)
        self.db.save(rec)
        live.rec = rec

    async def pause(self, name: str) -> Live:
        live, _ = self.running(name)
        async with live.lock:
            assert live.vm is not None
            live.rec = self.db.transition(live.rec, state.PAUSED)
            async with Qmp(live.vm.qemu.cfg.qmp_socket) as qmp:
                await qmp.execute("stop")
            if live.logbook:
                live.logbook.note("paused")
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
                    await self.down(rec.name)
                continue
            if rec.state in (state.RUNNING, state.PAUSED) and live.vm is not None:
                if not live.lock.locked() and not live.vm.qemu.alive():
                    await asyncio.sleep(0.1)  # let the console pump catch the last lines
                    reason = live.vm.qemu.boot_failure()
                    await self._fail(live, f"QEMU exited: {reason}")
                elif live.vm.agent is not None and live.vm.agent.failure is not None:
                    await self._fail(live, f"agent connection lost: {live.vm.agent.failure}")

    # -- exec and files -------------------------------------------------------------------
    async def exec_stream(self, name: str, req: M.ExecRequest) -> AsyncIterator[M.ExecEvent]:
        live, agent = self.running(name)
        env = {**live.rec.env, **req.env}
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
                    yield M.ExecEvent(type=str(stream), data=frame.payload)
            elif frame.type == P.OK:
                from mvm.agent.client import ExecReply, _convert

                reply: ExecReply = _convert(frame, ExecReply, "exec")
                yield M.ExecEvent(
                    type="exit",
                    exit_code=reply.exit_code,
                    timed_out=reply.timed_out,
                    signal=reply.signal,
                    duration=reply.duration,
                    truncated_stdout=reply.truncated.stdout,
                    truncated_stderr=reply.truncated.stderr,
                )

    # -- snapshots ----------------------------------------------------------------------
    async def snapshot_save(self, name: str, snap: str) -> SnapshotRecord:
        check_name(snap, "snapshot")
        live = self.get(name)
        if live.rec.state not in (state.RUNNING, state.PAUSED) or live.vm is None:
            raise SandboxStateError(f"sandbox {name} is {live.rec.state}", sandbox=name)
        if self.db.snapshot(name, snap) is not None:
            raise SnapshotExists(
                f"{name} already has a snapshot {snap!r}",
                hint=f"remove it: mvmctl snapshot rm {name} {snap}",
            )
        async with live.lock:
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
        rec = SandboxRecord(
            id=vm_id,
            name=srec.sandbox,
            image=srec.image,
            image_id=srec.image_id,
            state=state.CREATING,
            cpus=srec.cpus,
            memory_mb=srec.memory_mb,
            disk_mb=srec.disk_mb,
            env={},
            created=now,
            ttl_seconds=M.DEFAULT_TTL,
            expires_at=now + M.DEFAULT_TTL,
            run_dir=str(paths.run_dir() / vm_id),
        )
        async with self._create_lock:
            if srec.sandbox in self.live:
                raise SandboxExists(f"a sandbox named {srec.sandbox!r} already exists")
            self.db.insert(rec)
            live = Live(rec)
            self.live[rec.name] = live
        async with live.lock:
            spec = VMSpec(
                image, cpus=rec.cpus, memory_mb=rec.memory_mb, overlay_size=f"{rec.disk_mb}m"
            )
            cfg = replace(base_config(spec, self.store, Path(rec.run_dir)), incoming=True)
            try:
                vm = await MicroVM._start(
                    vm_id, spec, cfg, 120.0, restore=Path(srec.path) / "state"
                )
            except BaseException:
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


def replace_rec(rec: SandboxRecord, **changes: object) -> SandboxRecord:
    return msgspec.structs.replace(rec, **changes)


__all__ = ["Live", "Manager", "info", "replace"]
