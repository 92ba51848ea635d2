"""The VMM seam: what the sandbox service needs from a virtual machine monitor.

The service drives VMs only through this interface. ``mvm.vm.MicroVM`` (QEMU microvm)
implements it; another monitor (Firecracker, cloud-hypervisor where KVM exists) is a
second implementation of the same methods, with no change to the service.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mvm.agent.client import AgentClient


class VmmBackend(Protocol):
    """One running VM: its agent connection, lifecycle and saved state.

    Starting one is the class's business (``boot``: fresh or from a boot template;
    ``load``: from a saved state; ``attach``: to a VM a previous daemon started).
    """

    id: str
    agent: AgentClient | None
    boot_seconds: float

    @property
    def pid(self) -> int | None: ...

    def require_agent(self) -> AgentClient: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def save(self, path: Path, *, keep_running: bool) -> None: ...

    async def restore(self, state: Path) -> None: ...

    def alive(self) -> bool: ...

    def console(self, listener: Callable[[bytes], None]) -> None: ...

    def failure(self) -> str: ...

    async def detach(self) -> None: ...

    async def destroy(self) -> None: ...
