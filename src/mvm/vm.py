"""A booted microVM with a connected agent: the unit every higher layer builds on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mvm import paths
from mvm.agent.client import AgentClient
from mvm.errors import AgentProtocolError, InvalidArgument, VMBootTimeout, VMDied, VMError
from mvm.images.store import Image, ImageStore
from mvm.vmm import accel
from mvm.vmm.argv import VMConfig, validate
from mvm.vmm.qemu import QemuProcess

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


class MicroVM:
    """One QEMU microVM and its agent connection. Use ``async with await MicroVM.boot(...)``."""

    def __init__(self, vm_id: str, spec: VMSpec, qemu: QemuProcess) -> None:
        self.id = vm_id
        self.spec = spec
        self.qemu = qemu
        self.agent: AgentClient | None = None
        self.boot_seconds = 0.0
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
    ) -> MicroVM:
        store = store or ImageStore()
        vm_id = vm_id or new_id()
        choice = accel.detect()
        kernel = spec.image.kernel()
        cfg = VMConfig(
            kernel=kernel.vmlinux,
            initrd=store.initramfs_for(spec.image),
            rootfs=Path(spec.image.rootfs),
            run_dir=paths.run_dir() / vm_id,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            accel=choice.accel,
            tsc_khz=accel.host_tsc_khz(),
            overlay_size=spec.overlay_size,
        )
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
            vm.agent = await AgentClient.connect(cfg.agent_socket)
            try:
                await vm.agent.hello(boot_timeout, alive=qemu.alive)
            except (TimeoutError, VMDied, AgentProtocolError) as exc:
                await asyncio.sleep(0.1)  # let the console pump catch the last lines
                if not qemu.alive():
                    raise VMDied(
                        f"the VM died during boot: {qemu.console_tail(1500) or qemu.stderr_tail()}",
                        vm_id=vm_id,
                    ) from None
                if isinstance(exc, AgentProtocolError):
                    raise
                raise VMBootTimeout(
                    f"the guest agent did not answer within {boot_timeout:.0f}s",
                    hint="see the console log; raise MVM_BOOT_TIMEOUT on a slow host",
                    console=qemu.console_tail(1500),
                ) from None
        except BaseException:
            await vm.destroy()
            raise
        vm.boot_seconds = time.monotonic() - started
        return vm

    def require_agent(self) -> AgentClient:
        if self.agent is None:
            raise VMError("the VM has no agent connection")
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
