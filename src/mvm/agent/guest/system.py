"""What the agent does to the guest system itself, apart from commands and files: the
hostname at start, the clock and RNG the host hands over at hello, and power-off.

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent.guest.base import log
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    from base import log


def setup_system() -> None:
    """What a tiny init does besides mounts (done by the initramfs): the hostname."""
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write("mvm")
    except OSError:
        pass


def set_clock(now: object) -> None:
    """Set the guest's wall clock to the host's (a VM restored from a snapshot is behind)."""
    if isinstance(now, (int, float)) and not isinstance(now, bool) and now > 1e9:
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(now))
        except OSError:
            pass


#: ioctl RNDRESEEDCRNG (_IO('R', 0x07)): reseed the kernel's CRNG from its input pool now.
RNDRESEEDCRNG = 0x5207


def reseed_rng(seed_hex: str) -> None:
    """Mix the host's seed into the kernel's input pool, then reseed the CRNG at once.
    Clones of one template resume with the same CRNG state, and since Linux 5.18 a write
    to /dev/urandom only reaches the CRNG at its next timed reseed (up to a minute
    away): without the ioctl two clones read the same /dev/urandom bytes meanwhile."""
    try:
        data = bytes.fromhex(seed_hex)
    except ValueError:
        return
    try:
        with open("/dev/urandom", "wb", buffering=0) as f:
            f.write(data)
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
    except OSError as exc:
        log(f"cannot reseed the guest RNG: {exc}")


def poweroff() -> None:
    """Flush the disks and power the VM off (sysrq: no init scripts to wait for)."""
    os.sync()
    try:
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o")
    except OSError as exc:
        log(f"poweroff failed: {exc}")
