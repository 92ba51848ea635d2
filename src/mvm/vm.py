"""A booted microVM with a connected agent: the unit every higher layer builds on.

``MicroVM`` is the QEMU microvm implementation of ``mvm.vmm.backend.VmmBackend``: the
service starts, attaches, pauses, resumes, saves and restores VMs only through those
methods, never through QEMU's sockets or this module's private parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from mvm import paths, templates, warm
from mvm.agent.client import AgentClient
from mvm.errors import (
    AgentProtocolError,
    CommandTimeout,
    InvalidArgument,
    StateLoadError,
    VMBootTimeout,
    VMDied,
    VMError,
)
from mvm.images.store import Image, ImageStore
from mvm.vmm import accel
from mvm.vmm.argv import VMConfig, validate
from mvm.vmm.qemu import QemuProcess, find_qemu, qemu_binary
from mvm.vmm.qmp import Qmp

log = logging.getLogger(__name__)

#: Seconds from QEMU start to the agent's handshake before the boot counts as failed.
#: TCG cold boots take ~5 s on 2 cores; parallel boots share the CPU. ``MVM_BOOT_TIMEOUT``.
BOOT_TIMEOUT = float(os.environ.get("MVM_BOOT_TIMEOUT", "120"))


def new_id() -> str:
    return "sb-" + secrets.token_hex(5)


@dataclass(frozen=True)
class VMSpec:
    image: Image
    cpus: int = 1
    memory_mb: int = 512
    overlay_size: str = "50%"
    #: A NIC whose only way out is the sandbox's egress proxy (part of the VM's shape).
    network: bool = False
    #: Extra virtio-blk disks (builder VMs only): (raw file, read-only, serial).
    disks: tuple[tuple[Path, bool, str], ...] = ()


def egress_relay_argv() -> tuple[str, ...]:
    """The program QEMU runs per guest connection to the egress address (stdlib only)."""
    from mvm.vmm import egress_relay

    return (sys.executable, "-I", str(Path(egress_relay.__file__).resolve()))


def template_key_for(spec: VMSpec, base: VMConfig) -> str:
    """The boot-template key of a VM shape: everything a template and its clones share."""
    return templates.template_key(
        image_id=spec.image.id,
        initramfs=base.initrd.name,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        overlay_size=spec.overlay_size,
        accel=base.accel,
        qemu=templates.qemu_identity(find_qemu(base.qemu)),
        network=spec.network,
        warm=warm.key_part(spec.image.manifest.warm),
    )


def base_config(spec: VMSpec, store: ImageStore, run_dir: Path) -> VMConfig:
    """The VM config for a spec on this host (accelerator, TSC rate, current initramfs)."""
    return VMConfig(
        kernel=spec.image.kernel().vmlinux,
        initrd=store.initramfs_for(spec.image),
        rootfs=Path(spec.image.rootfs),
        run_dir=run_dir,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        accel=accel.detect().accel,
        tsc_khz=accel.host_tsc_khz(),
        overlay_size=spec.overlay_size,
        qemu=qemu_binary(),
        network=spec.network,
        egress_relay=egress_relay_argv() if spec.network else (),
        extra_disks=spec.disks,
    )


async def make_template(
    tstore: templates.TemplateStore,
    key: str,
    spec: VMSpec,
    store: ImageStore,
    boot_timeout: float,
) -> templates.Template:
    """Cold-boot a VM whose RAM is a shared file, wait for its agent, save its device state."""
    recipe = spec.image.manifest.warm
    async with tstore.lock(key, timeout=2 * boot_timeout + 60 + (recipe.timeout if recipe else 0)):
        existing = tstore.get(key)
        if existing is not None:  # made by someone else while we waited
            return existing
        staging = tstore.staging()
        try:
            vm_id = new_id()
            cfg = replace(
                base_config(spec, store, paths.run_dir() / vm_id),
                memory_file=staging / "ram",
                memory_shared=True,
            )
            vm = await MicroVM._start(vm_id, spec, cfg, boot_timeout)
            try:
                await vm.run_warm_recipe()  # before the snapshot: clones start warm
                if vm.agent is not None:
                    await vm.agent.close()  # idle, no connection: what a clone starts from
                    vm.agent = None
                async with Qmp(cfg.qmp_socket) as qmp:
                    await qmp.save_state(staging / "state")
            finally:
                await vm.destroy()
            meta: dict[str, object] = {
                "image": spec.image.name,
                "image_id": spec.image.id,
                "cpus": spec.cpus,
                "memory_mb": spec.memory_mb,
                "accel": cfg.accel,
                "boot_seconds": vm.boot_seconds,
                "created": time.time(),
            }
            return tstore.commit(staging, key, meta)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


class MicroVM:
    """One QEMU microVM and its agent connection. Use ``async with await MicroVM.boot(...)``."""

    def __init__(self, vm_id: str, spec: VMSpec, qemu: QemuProcess) -> None:
        self.id = vm_id
        self.spec = spec
        self.qemu = qemu
        self.agent: AgentClient | None = None
        self.boot_seconds = 0.0
        self.restored = False
        self.accel = qemu.cfg.accel

    @property
    def run_dir(self) -> Path:
        return self.qemu.cfg.run_dir

    @classmethod
    async def boot(
        cls,
        spec: VMSpec,
        *,
        store: ImageStore | None = None,
        vm_id: str | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        fast: bool | None = None,
    ) -> MicroVM:
        """Start a VM: restored from a boot template when possible (``fast``, the default
        unless ``MVM_TEMPLATES=0``), else cold-booted. A template is made on first use."""
        store = store or ImageStore()
        vm_id = vm_id or new_id()
        base = base_config(spec, store, paths.run_dir() / vm_id)
        if spec.disks:
            fast = False  # per-build disks are no part of a template's shape
        if fast if fast is not None else templates.enabled():
            tstore = templates.TemplateStore()
            key = template_key_for(spec, base)
            tpl = tstore.get(key) or await make_template(tstore, key, spec, store, boot_timeout)
            cfg = replace(base, memory_file=tpl.ram, memory_shared=False, incoming=True)
            try:
                return await cls._start(vm_id, spec, cfg, boot_timeout, restore=tpl.state)
            except StateLoadError as exc:
                # Loading the template itself failed: drop it (if still the same one).
                log.warning("template %s is unusable (%s); booting cold", key, exc)
                await tstore.discard_if_same(key, tpl)
            except VMError as exc:
                # Something passing (load, a race): keep the template, boot cold this once.
                log.warning("restoring template %s failed (%s); booting cold", key, exc)
        vm = await cls._start(vm_id, spec, base, boot_timeout)
        try:
            await vm.run_warm_recipe()  # a cold VM gets what a template clone has
        except BaseException:
            await vm.destroy()
            raise
        return vm

    @classmethod
    async def _start(
        cls,
        vm_id: str,
        spec: VMSpec,
        cfg: VMConfig,
        boot_timeout: float,
        restore: Path | None = None,
    ) -> MicroVM:
        problems = validate(cfg)
        if problems:
            raise InvalidArgument("; ".join(problems))
        if len(str(cfg.qmp_socket)) > 100:
            raise InvalidArgument(
                f"run directory path too long for Unix sockets: {cfg.run_dir}",
                hint="set MVM_RUN_DIR (or MVM_HOME) to a shorter path",
            )
        qemu = QemuProcess(cfg)
        vm = cls(vm_id, spec, qemu)
        started = time.monotonic()
        try:
            await qemu.start()
            qmp = Qmp(cfg.qmp_socket)
            try:
                await qmp.connect()
            except VMError:
                qemu.check_alive("before QMP answered")
                raise
            try:
                # Set on every VM so every migration stream has the same format: a
                # snapshot of any VM can then be loaded by any other of its shape.
                await qmp.ignore_shared_memory()
                if restore is not None:
                    try:
                        await qmp.restore_state(restore)
                    except VMError as exc:
                        raise StateLoadError(str(exc)) from None
                    vm.restored = True
            finally:
                await qmp.close()
            try:
                vm.agent = await AgentClient.connect(cfg.agent_socket)
            except OSError as exc:
                qemu.check_alive("before the agent socket answered")
                raise VMError(f"cannot connect to the agent socket: {exc}") from None
            try:
                await vm.agent.hello(boot_timeout, alive=qemu.alive)
            except (CommandTimeout, VMDied, AgentProtocolError) as exc:
                await asyncio.sleep(0.1)  # let the console pump catch the last lines
                if not qemu.alive():
                    raise VMDied(
                        f"the VM died during boot:\n{qemu.boot_failure()}",
                        vm_id=vm_id,
                    ) from None
                if isinstance(exc, AgentProtocolError):
                    raise
                raise VMBootTimeout(
                    f"the guest agent did not answer within {boot_timeout:g}s",
                    hint="see the console log; raise MVM_BOOT_TIMEOUT on a slow host",
                    console=qemu.boot_failure(),
                ) from None
        except BaseException:
            await vm.destroy()
            raise
        vm.boot_seconds = time.monotonic() - started
        return vm

    @classmethod
    async def load(
        cls,
        spec: VMSpec,
        state: Path,
        *,
        store: ImageStore,
        vm_id: str,
        run_dir: Path,
        boot_timeout: float = BOOT_TIMEOUT,
    ) -> MicroVM:
        """Start a new VM of ``spec`` from a saved state (a snapshot of the same shape)."""
        cfg = replace(base_config(spec, store, run_dir), incoming=True)
        return await cls._start(vm_id, spec, cfg, boot_timeout, restore=state)

    @classmethod
    async def attach(
        cls,
        vm_id: str,
        spec: VMSpec,
        *,
        store: ImageStore,
        run_dir: Path,
        pid: int,
        paused: bool = False,
        timeout: float = 30.0,
    ) -> MicroVM:
        """Reconnect to a VM whose QEMU outlived the process that started it (a paused one
        runs for the handshake and is paused again)."""
        cfg = base_config(spec, store, run_dir)
        qemu = QemuProcess(cfg)
        qemu.adopt(pid)
        vm = cls(vm_id, spec, qemu)
        try:
            if paused:
                await vm.resume()  # the handshake needs a running guest
            vm.agent = await AgentClient.connect(cfg.agent_socket)
            await vm.agent.hello(timeout, alive=qemu.alive)
            if paused:
                await vm.pause()
        except BaseException:
            if vm.agent is not None:
                await vm.agent.close()
            await qemu.stop_capture()
            raise
        return vm

    async def restore(self, state: Path, boot_timeout: float = BOOT_TIMEOUT) -> None:
        """Replace this VM's QEMU by a new one loaded from a saved state (a snapshot)."""
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        await self.qemu.stop()
        cfg = replace(self.qemu.cfg, memory_file=None, incoming=True)
        fresh = await MicroVM._start(self.id, self.spec, cfg, boot_timeout, restore=state)
        self.qemu, self.agent = fresh.qemu, fresh.agent
        self.boot_seconds = fresh.boot_seconds

    async def pause(self) -> None:
        """Stop the guest's CPUs (its memory and connections stay)."""
        async with Qmp(self.qemu.cfg.qmp_socket) as qmp:
            await qmp.execute("stop")

    async def resume(self) -> None:
        async with Qmp(self.qemu.cfg.qmp_socket) as qmp:
            await qmp.execute("cont")

    async def save(self, path: Path, *, keep_running: bool) -> None:
        """Write the VM's device and memory state to ``path`` (the guest is stopped while it
        is written; ``keep_running`` lets it run again afterwards)."""
        async with Qmp(self.qemu.cfg.qmp_socket) as qmp:
            await qmp.save_state(path)
            if keep_running:
                await qmp.execute("cont")

    def alive(self) -> bool:
        return self.qemu.alive()

    @property
    def pid(self) -> int | None:
        return self.qemu.pid

    def console(self, listener: Callable[[bytes], None]) -> None:
        """Send the VM's console output to ``listener`` from now on."""
        self.qemu.console_listener = listener

    def failure(self) -> str:
        """What the console says about why the VM stopped."""
        return self.qemu.boot_failure()

    async def detach(self) -> None:
        """Let go of the VM without stopping it (mvmd exits; the next one attaches)."""
        if self.agent is not None:
            await self.agent.close()
        await self.qemu.stop_capture()

    async def run_warm_recipe(self) -> None:
        """Run the image's warm recipe (``mvm.warm``), if it has one."""
        recipe = self.spec.image.manifest.warm
        if recipe is not None:
            await warm.prepare(self.require_agent(), recipe)

    def require_agent(self) -> AgentClient:
        if self.agent is None:
            raise VMError("the VM has no agent connection")
        if isinstance(self.agent.failure, VMDied) and self.qemu.proc is not None:
            # A killed QEMU closes its sockets before it can be reaped: the agent may see the
            # end first. Give the exit a moment (bounded) so the answer is "it died".
            with contextlib.suppress(Exception):
                self.qemu.proc.wait(timeout=1.0)
        if self.agent.failure is not None and not self.qemu.alive():
            raise VMDied(
                f"the VM stopped: {self.qemu.console_tail(1000) or 'no console output'}",
                vm_id=self.id,
            )
        return self.agent

    async def destroy(self) -> None:
        """Kill QEMU and remove everything the VM had on the host. Idempotent."""
        if self.agent is not None:
            await self.agent.close()
        await self.qemu.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.run_dir)

    async def __aenter__(self) -> MicroVM:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.destroy()
