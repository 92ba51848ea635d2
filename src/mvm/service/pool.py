"""A pool of waiting VMs: per hot shape, QEMU processes already started with ``-incoming
defer`` on the shape's boot template (RAM mapped copy-on-write, QMP ready), so a create
only loads the template's device state, ``cont``s and shakes hands with the agent.

A shape becomes hot at its first create in this mvmd (that create boots as before).
Bounds: ``MVM_POOL_SIZE`` idle VMs per shape (default 0: off until it pays, see
docs/design.md; e.g. 2),
``MVM_POOL_MAX_MB`` of guest memory over all idle VMs (default 2048), at most
``MAX_SHAPES`` shapes. A VM is popped before it is used (never handed out twice) and
destroyed on any failure (never reused); the create then boots as if there were no
pool. Only shapes without a network are pooled (a NIC's egress relay names the
sandbox's own run directory). Idle VMs are killed on ``close`` (daemon stop).

Refill: REFILL_DELAY after a burst's last hand-out, its QEMUs at nice PREPARE_NICE until
they wait; the shape's template key is cached and re-checked by each refill (docs/design.md).

Pre-warming (default; ``MVM_POOL_WARM=0`` turns it off; docs/design.md): a waiting VM is
also restored, handshaken and has run one ``true`` as the guest user while it waits, so
TCG's translation of the guest's exec path and the first touches of the template RAM are
paid before the create. At hand-out it gets the create's own handshake (fresh nonce,
clock, RNG seed), as an unwarmed one does; egress and secrets are per sandbox and per exec
in the service, untouched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from mvm import paths, templates
from mvm.agent.client import AgentClient
from mvm.errors import MvmError
from mvm.forkvm import open_qmp
from mvm.images.store import ImageStore
from mvm.vm import BOOT_TIMEOUT, MicroVM, VMSpec, base_config, template_key_for
from mvm.vmm.qemu import QemuProcess

log = logging.getLogger(__name__)

MAX_SHAPES = 4
#: The handshake of a restored template answers in well under a second; bounded anyway.
HANDOUT_TIMEOUT = 60.0
#: Seconds after the last hand-out of a burst before the refill starts (lets the new
#: sandboxes' first requests have the CPU; each hand-out pushes it back, up to
#: REFILL_MAX_DELAY after the first one not yet refilled).
REFILL_DELAY = 1.0
REFILL_MAX_DELAY = 10.0
#: Bound on a pre-warming VM's one exec of ``true``.
WARM_EXEC_TIMEOUT = 60.0
#: Niceness of a waiting VM's QEMU while it is prepared (restore, handshake, exec): a
#: refill that overlaps a burst yields the CPU to the sandboxes just handed out. Back to
#: 0 before the VM waits, so a sandbox never inherits it.
PREPARE_NICE = 10


def _can_unnice() -> bool:
    """Whether this process may lower a niceness back to 0 (root, or RLIMIT_NICE)."""
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def _renice(pid: int | None, nice: int) -> None:
    """Set every thread of ``pid`` to ``nice`` (Linux niceness is per thread)."""
    if pid is None:
        return
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def pool_size() -> int:
    try:
        return max(0, int(os.environ.get("MVM_POOL_SIZE", "0")))
    except ValueError:
        return 0


def pool_warm() -> bool:
    """Pre-warm waiting VMs (default on: bench/pool.py measured create -> first exec about
    5x faster than an unwarmed pool); ``MVM_POOL_WARM=0`` keeps them unrestored."""
    return os.environ.get("MVM_POOL_WARM", "1").strip() != "0"


def pool_max_mb() -> int:
    try:
        return max(0, int(os.environ.get("MVM_POOL_MAX_MB", "2048")))
    except ValueError:
        return 0


@dataclass
class Waiting:
    """A QEMU waiting for ``migrate-incoming`` of its template's state, or (``warm``)
    already running it, handshaken, one exec done."""

    vm: MicroVM
    state: Path
    warm: bool = False


def _shape(spec: VMSpec) -> tuple[object, ...]:
    return (spec.image.id, spec.image.name, spec.cpus, spec.memory_mb, spec.overlay_size)


class Pool:
    def __init__(self, store: ImageStore, *, enabled: bool = True) -> None:
        self.store = store
        self.size = pool_size() if enabled else 0
        self.warm = pool_warm()
        self.max_mb = pool_max_mb()
        self.idle: dict[str, list[Waiting]] = {}
        self.shapes: dict[str, VMSpec] = {}
        self.handed_out = 0
        self._filling: dict[str, asyncio.Task[None]] = {}
        #: Per shape: the pending refill timer and when the first hand-out it covers was.
        self._timers: dict[str, tuple[asyncio.TimerHandle, float]] = {}
        #: Template key per shape, computed once and re-checked by each refill (off the
        #: hand-out path: computing it builds and hashes the initramfs, ~40 ms of CPU).
        self._keys: dict[tuple[object, ...], str] = {}
        self._closed = False

    # -- accounting ---------------------------------------------------------------------
    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def idle_mb(self) -> int:
        return sum(w.vm.spec.memory_mb for v in self.idle.values() for w in v)

    def status(self) -> dict[str, int]:
        return {
            "size": self.size,
            "max_mb": self.max_mb,
            "shapes": len(self.shapes),
            "idle": self.idle_count(),
            "idle_mb": self.idle_mb(),
            "handed_out": self.handed_out,
            "warm": int(self.warm),
        }

    def _key(self, spec: VMSpec) -> str | None:
        if self.size == 0 or self._closed or spec.network or not templates.enabled():
            return None
        shape = _shape(spec)
        key = self._keys.get(shape)
        if key is None:
            key = self._keys[shape] = self._template_key(spec)
        return key

    def _template_key(self, spec: VMSpec) -> str:
        base = base_config(spec, self.store, paths.run_dir() / "pool")
        return template_key_for(spec, base)

    async def _rekey(self, key: str, spec: VMSpec) -> str:
        """The shape's template key now (its initramfs may have been rebuilt since it was
        cached): if it changed, the VMs waiting under the old key are destroyed and the
        shape moves to the new one."""
        fresh = await asyncio.to_thread(self._template_key, spec)
        if fresh == key:
            return key
        log.info("pool shape %s now has template %s; dropping its waiting VMs", key, fresh)
        self._keys[_shape(spec)] = fresh
        self.shapes.pop(key, None)
        self.shapes[fresh] = spec
        task = self._filling.pop(key, None)
        if task is not None:
            self._filling[fresh] = task  # this fill: no second one for the new key
        for w in self.idle.pop(key, []):
            await w.vm.destroy()
        return fresh

    # -- hand-out -----------------------------------------------------------------------
    async def take(self, spec: VMSpec, vm_id: str) -> MicroVM | None:
        """A running VM of ``spec`` from the pool, named ``vm_id``; None when there is none
        ready (the caller boots one). Marks the shape hot and refills in the background."""
        key = self._key(spec)
        if key is None:
            return None
        if key not in self.shapes and len(self.shapes) < MAX_SHAPES:
            self.shapes[key] = spec
        waiting = self.idle.get(key) or []
        got = waiting.pop(0) if waiting else None  # popped: no one else can take it
        # Later, not now: a QEMU starting beside the hand-outs takes CPU from their first execs.
        self._refill_later(key)
        if got is None:
            return None
        try:
            vm = await asyncio.wait_for(self._start(got), HANDOUT_TIMEOUT)
        except (MvmError, OSError, TimeoutError) as exc:
            log.warning("pooled VM %s failed at hand-out (%s); booting instead", got.vm.id, exc)
            await got.vm.destroy()
            return None
        vm.id = vm_id
        self.handed_out += 1
        return vm

    async def _start(self, w: Waiting) -> MicroVM:
        vm = w.vm
        try:
            if not w.warm:
                await self._restore(vm, w.state)
            assert vm.agent is not None
            # The create's own handshake: fresh nonce, clock and RNG seed (also after a
            # warm-up hello, which this one supersedes).
            await vm.agent.hello(BOOT_TIMEOUT, alive=vm.qemu.alive)
        except BaseException:
            await vm.destroy()
            raise
        vm.boot_seconds = 0.0
        return vm

    @staticmethod
    async def _restore(vm: MicroVM, state: Path) -> None:
        async with open_qmp(vm.qemu.cfg.qmp_socket, vm.qemu.alive) as qmp:
            await qmp.restore_state(state)
        vm.restored = True
        vm.agent = await AgentClient.connect(vm.qemu.cfg.agent_socket)

    async def _warm_up(self, vm: MicroVM, state: Path) -> None:
        """Restore, handshake, run ``true`` once: what a create's first exec would pay."""
        await self._restore(vm, state)
        assert vm.agent is not None
        await vm.agent.hello(BOOT_TIMEOUT, alive=vm.qemu.alive)
        r = await vm.agent.exec(["true"], timeout=WARM_EXEC_TIMEOUT)
        if r.exit_code != 0:
            raise MvmError(f"warm-up exec in a pooled VM exited {r.exit_code}")

    def booted(self, spec: VMSpec) -> None:
        """A create of ``spec`` booted without the pool (none waiting, or its first create,
        which may have made the shape's template only now): refill from that template."""
        key = self._key(spec)
        if key is not None and key in self.shapes:
            self._refill_later(key)

    # -- refill -------------------------------------------------------------------------
    def _refill_later(self, key: str) -> None:
        """(Re)arm the shape's refill: REFILL_DELAY after this call, so a burst of creates
        is handed out before any replacement starts, but no later than REFILL_MAX_DELAY
        after the first call since the last refill started."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._timers.pop(key, None)
        first = now
        if pending is not None:
            pending[0].cancel()
            first = pending[1]
        at = min(now + REFILL_DELAY, first + REFILL_MAX_DELAY)
        self._timers[key] = (loop.call_at(at, self._refill, key), first)

    def _refill(self, key: str) -> None:
        self._timers.pop(key, None)
        if self._closed:
            return
        task = self._filling.get(key)
        if task is None or task.done():
            self._filling[key] = asyncio.create_task(self._fill(key))

    def _room(self, key: str, spec: VMSpec) -> bool:
        return (
            not self._closed
            and len(self.idle.get(key, [])) < self.size
            and self.idle_mb() + spec.memory_mb <= self.max_mb
        )

    async def _fill(self, key: str) -> None:
        spec = self.shapes.get(key)
        if spec is None:
            return
        key = await self._rekey(key, spec)
        while self._room(key, spec):
            tpl = templates.TemplateStore().get(key)
            if tpl is None:
                return  # the first create of the shape makes it; refilled on the next
            try:
                w = await self._prepare(spec, tpl)
            except (MvmError, OSError, TimeoutError) as exc:
                log.warning("could not start a pooled VM: %s", exc)
                return
            if self._closed:
                await w.vm.destroy()
                return
            self.idle.setdefault(key, []).append(w)

    async def _prepare(self, spec: VMSpec, tpl: templates.Template) -> Waiting:
        """Start QEMU on the template's RAM, waiting for its state, QMP set up."""
        vm_id = "pl-" + secrets.token_hex(5)
        base = base_config(spec, self.store, paths.run_dir() / vm_id)
        cfg = replace(base, memory_file=tpl.ram, memory_shared=False, incoming=True)
        vm = MicroVM(vm_id, spec, QemuProcess(cfg))
        nice = _can_unnice()
        try:
            await vm.qemu.start()
            if nice:
                _renice(vm.pid, PREPARE_NICE)
            # Its own copy of the device state (tens of KiB): a template re-made meanwhile
            # must not pair this VM's RAM mapping with another template's devices.
            state = cfg.run_dir / "template-state"
            await asyncio.to_thread(shutil.copyfile, tpl.state, state)
            async with open_qmp(cfg.qmp_socket, vm.qemu.alive) as qmp:
                await qmp.ignore_shared_memory()
            if self.warm:
                await asyncio.wait_for(self._warm_up(vm, state), HANDOUT_TIMEOUT)
            if nice:
                _renice(vm.pid, 0)  # raises if it cannot: the VM is then destroyed
        except BaseException:
            await vm.destroy()
            raise
        return Waiting(vm, state, warm=self.warm)

    def reap_orphans(self, keep: set[int]) -> int:
        """Kill waiting VMs an earlier mvmd left (it was killed before draining): QEMUs
        whose command line names a pool run directory, except sandboxes' (``keep``)."""
        if self.size == 0:
            return 0
        marker = str(paths.run_dir() / "pl-").encode()
        n = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in keep:
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu" in cmd.split(b"\0", 1)[0] and marker in cmd:
                with contextlib.suppress(OSError):
                    os.kill(int(proc.name), signal.SIGKILL)
                    n += 1
        return n

    # -- shutdown -----------------------------------------------------------------------
    async def close(self) -> None:
        """Kill every idle VM (daemon stop); a fill in progress stops at its next step."""
        self._closed = True
        for handle, _ in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in self._filling.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for waiting in self.idle.values():
            for w in waiting:
                await w.vm.destroy()
        self.idle.clear()
