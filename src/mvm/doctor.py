"""``mvmctl doctor``: what this host can do, each check with a status and the fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from mvm import paths
from mvm.errors import MvmError
from mvm.images import apt_sources
from mvm.images.kernel import cached_kernels
from mvm.images.store import ImageStore
from mvm.vmm import accel
from mvm.vmm.qemu import qemu_binary

OK, WARN, FAIL = "ok", "warn", "fail"
#: Free space under MVM_HOME below which building images is likely to fail.
MIN_FREE_BYTES = 2 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _tool(name: str, package: str, required: bool = True) -> Check:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return Check(name, OK, path)
    return Check(name, FAIL if required else WARN, "not found", f"apt-get install {package}")


def _qemu() -> Check:
    path = shutil.which(qemu_binary())
    if not path:
        return Check("qemu", FAIL, f"{qemu_binary()} not found", "apt-get install qemu-system-x86")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        machines = subprocess.run(
            [path, "-M", "help"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("qemu", FAIL, f"cannot run {path}: {exc}")
    m = re.search(r"version (\S+)", out)
    version = m.group(1) if m else "unknown version"
    if "microvm" not in machines:
        return Check("qemu", FAIL, f"{version} lacks the microvm machine type", "use QEMU >= 4.2")
    return Check("qemu", OK, f"{version} at {path}, microvm supported")


def run_checks() -> list[Check]:
    checks = [_qemu()]
    a = accel.detect()
    checks.append(Check("accelerator", OK, f"{a.accel}: {a.reason}"))
    tsc = accel.host_tsc_khz()
    checks.append(
        Check(
            "tsc",
            OK if tsc else WARN,
            f"{tsc} kHz" if tsc else "unknown",
            "" if tsc else "guests may boot slowly (no tsc_early_khz)",
        )
    )
    for name, pkg in (
        ("busybox", "busybox-static"),
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("lz4", "lz4"),
        ("apt-get", "apt"),
    ):
        checks.append(_tool(name, pkg))
    try:
        apt_sources.sources_for_suite("bookworm")
        checks.append(Check("apt sources", OK, "Debian sources found in /etc/apt"))
    except MvmError as exc:
        checks.append(Check("apt sources", FAIL, exc.message, exc.hint or ""))
    home = paths.home()
    kernels = cached_kernels(home / "kernels")
    checks.append(
        Check(
            "kernel",
            OK if kernels else WARN,
            kernels[-1].release if kernels else "not cached yet",
            "" if kernels else "mvmctl build (fetches it)",
        )
    )
    images = ImageStore(home).all()
    checks.append(
        Check(
            "images",
            OK if images else WARN,
            ", ".join(sorted(i.name for i in images)) or "none built",
            "" if images else "mvmctl build --preset python",
        )
    )
    probe = home if home.exists() else home.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    checks.append(
        Check(
            "disk",
            OK if free >= MIN_FREE_BYTES else WARN,
            f"{free / (1 << 30):.1f} GiB free under {home}",
            "" if free >= MIN_FREE_BYTES else "free space or set MVM_HOME elsewhere",
        )
    )
    checks.append(
        Check(
            "user",
            OK if os.geteuid() == 0 else WARN,
            "root" if os.geteuid() == 0 else f"uid {os.geteuid()}",
            "" if os.geteuid() == 0 else "image builds (mmdebstrap) need root",
        )
    )
    return checks
