"""Choosing the accelerator: KVM only when it truly works, else TCG. ``MVM_ACCEL`` overrides."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mvm.errors import InvalidArgument


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def cpu_has_virt(cpuinfo: str) -> bool:
    return any(re.search(rf"^flags\s*:.*\b{f}\b", cpuinfo, re.M) for f in ("vmx", "svm"))


def kvm_usable(dev: Path = Path("/dev/kvm")) -> bool:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose(env: dict[str, str], cpuinfo: str, kvm_opens: bool) -> AccelChoice:
    """Pure decision: the override if set, KVM if /dev/kvm opens and the CPU has vmx/svm."""
    forced = env.get("MVM_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise InvalidArgument(f"MVM_ACCEL={forced!r} is not valid", hint="use kvm or tcg")
        return AccelChoice(forced, "MVM_ACCEL")
    if not kvm_opens:
        return AccelChoice("tcg", "/dev/kvm cannot be opened")
    if not cpu_has_virt(cpuinfo):
        return AccelChoice("tcg", "the CPU has no vmx/svm flag (nested KVM would be unusably slow)")
    return AccelChoice("kvm", "/dev/kvm opens and the CPU has vmx/svm")


def detect() -> AccelChoice:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return choose(dict(os.environ), cpuinfo, kvm_usable())


def tsc_khz(cpuinfo: str) -> int | None:
    """The host TSC rate in kHz (from ``cpu MHz``), for the guest's ``tsc_early_khz``."""
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)
    return int(float(m.group(1)) * 1000) if m else None


def host_tsc_khz() -> int | None:
    try:
        return tsc_khz(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
