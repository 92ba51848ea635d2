"""Build and boot VMs whose guest agent is an attacker's program (see hostile_agent.py).

The initramfs is the real one (same busybox, modules and /init, from
``mvm.images.initramfs.entries_for``) with ``mvm/agent.py`` swapped, so the VM boots
exactly like a real sandbox and the attacker is root (PID 1) inside it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from mvm import paths
from mvm.images import initramfs
from mvm.images.store import Image, ImageStore
from mvm.vm import MicroVM, VMSpec, base_config, new_id

HOSTILE_SOURCE = Path(__file__).with_name("hostile_agent.py")


def hostile_agent_source() -> bytes:
    """The attacker's agent.py: the shipped agent's source as a constant, then the attack."""
    real = initramfs.agent_sources()["agent.py"].decode()
    return f"REAL_AGENT_SOURCE = {real!r}\n".encode() + HOSTILE_SOURCE.read_bytes()


def build_hostile_initramfs(image: Image, out_dir: Path) -> Path:
    """Write the hostile initramfs under ``out_dir`` (named by its hash) and return it."""
    entries = initramfs.entries_for(image.kernel(), initramfs.find_busybox().read_bytes())
    swapped = [
        replace(e, data=hostile_agent_source()) if e.path == "mvm/agent.py" else e for e in entries
    ]
    assert swapped != entries, "the initramfs has no mvm/agent.py to replace"
    archive = initramfs.newc(swapped)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"hostile-{hashlib.sha256(archive).hexdigest()[:16]}.cpio"
    path.write_bytes(archive)
    return path


async def boot_hostile(
    image: Image, initrd: Path, *, mode: str = "menu", boot_timeout: float = 120.0
) -> MicroVM:
    """Cold-boot the image with the hostile initramfs (never from a template: the
    template store is keyed by the real initramfs). ``mode`` goes on the kernel command
    line as ``mvm.hostile=MODE``."""
    spec = VMSpec(image)
    vm_id = new_id()
    cfg = replace(
        base_config(spec, ImageStore(), paths.run_dir() / vm_id),
        initrd=initrd,
        extra_cmdline=(f"mvm.hostile={mode}",),
    )
    return await MicroVM._start(vm_id, spec, cfg, boot_timeout)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/status")
