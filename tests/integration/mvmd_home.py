"""A private mvmd for a test module: its own short MVM_HOME sharing the default image store.

Root filesystems, kernels, initramfs and boot templates are shared with the default store
through symlinks and its image records are copied, so nothing is rebuilt. ``private_home``
removes every sandbox at the end, stops the daemon, kills any QEMU left with the home in
its command line and deletes the home. ``Ctl`` runs ``mvmctl`` against it, each call a
bounded subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mvm import paths
from mvm.fsutil import remove_tree
from mvm.images.store import ImageStore
from mvm.vmm.qemu import qemu_binary

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]
#: What the private home shares with the default store (build.lock too, so a build here
#: and a build in the default home never clean up each other's staging files). Image
#: records are copied, not shared: a record holds absolute paths through the home that
#: wrote it, so the project image built here must not land in the default store (its
#: paths would dangle once this home is gone, and would name this home in the QEMU
#: command lines of other users of that image).
SHARED = ("rootfs", "kernels", "initramfs", "templates", "build.lock")
CMD_TIMEOUT = 120.0


@dataclass
class Res:
    rc: int
    out_b: bytes
    err_b: bytes
    args: tuple[str, ...]

    @property
    def out(self) -> str:
        return self.out_b.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.err_b.decode(errors="replace")

    def __str__(self) -> str:
        return (
            f"mvmctl {' '.join(self.args)} -> {self.rc}\nstdout: {self.out!r}\nstderr: {self.err!r}"
        )


class Ctl:
    """``mvmctl`` against the module's private MVM_HOME (each call a bounded subprocess)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "MVM_HOME": str(home)}
        self.env.pop("MVM_RUN_DIR", None)  # run dirs under $MVM_HOME/run

    def __call__(
        self, *args: str, input: bytes | str | None = None, timeout: float = CMD_TIMEOUT
    ) -> Res:
        data = input.encode() if isinstance(input, str) else input
        p = subprocess.run(
            [*MVMCTL, *args],
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        return Res(p.returncode, p.stdout, p.stderr, args)

    def ok(self, *args: str, **kw: Any) -> Res:
        r = self(*args, **kw)
        assert r.rc == 0, str(r)
        return r

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.ok(*args, "--json", **kw).out)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*MVMCTL, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            **kw,
        )

    def sandboxes(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.json("ls")}

    def sh(self, name: str, script: str, **kw: Any) -> Res:
        return self("exec", name, "--", "sh", "-c", script, **kw)

    def daemon_pid(self) -> int:
        r = self("daemon", "status", "--json", timeout=30)
        assert r.rc == 0, str(r)
        return int(json.loads(r.out)["pid"])


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a killed daemon's orphans may never be reaped here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def wait_until(pred: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def procs_mentioning(needle: str, argv0: str | None = None) -> list[int]:
    """Live processes whose command line (or environment) mentions ``needle``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            envb = (p / "environ").read_bytes() if argv0 is None else b""
        except OSError:
            continue
        if argv0 is not None:
            if argv0.encode() in os.path.basename(cmd.split(b"\0", 1)[0]) and (
                needle.encode() in cmd
            ):
                out.append(int(p.name))
        elif b"mvm.daemon" in cmd and f"MVM_HOME={needle}".encode() in envb.split(b"\0"):
            out.append(int(p.name))
    return [pid for pid in out if pid_alive(pid)]


def qemu_pids(home: Path) -> list[int]:
    return procs_mentioning(str(home), argv0="qemu")


def daemon_pids(home: Path) -> list[int]:
    return procs_mentioning(str(home))


def default_home() -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MVM_HOME", raising=False)
        return paths.home()


@contextlib.contextmanager
def private_home(
    prefix: str = "mvmd-", *, share: tuple[str, ...] = SHARED, source: Path | None = None
) -> Iterator[Path]:
    """A fresh MVM_HOME under /tmp (short: Unix socket paths) for one test module.

    Skips when QEMU is missing; builds the default image into the default store if needed.
    ``share`` names what is linked to the default store (e.g. leave out "templates" for a
    home with no boot templates, or "initramfs" to plant a different one). ``source``: the
    store to share instead of the default one.
    """
    if shutil.which(qemu_binary()) is None:
        pytest.skip(f"{qemu_binary()} not found: install qemu-system-x86")
    default = source or default_home()
    ImageStore(default).ensure("python")
    (default / "build.lock").touch()
    h = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    for n in share:
        (h / n).symlink_to(default / n)
    (h / "images").mkdir()
    for rec in (default / "images").glob("*.json"):
        shutil.copy(rec, h / "images" / rec.name)
    try:
        yield h
    finally:
        ctl = Ctl(h)
        for args, limit in ((("down", "--all"), 120), (("daemon", "stop"), 30)):
            try:
                ctl(*args, timeout=limit)
            except subprocess.TimeoutExpired:
                pass  # a hung daemon: killed below
        wait_until(lambda: not daemon_pids(h), 60)
        for pid in daemon_pids(h) + qemu_pids(h):  # started for this home only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not qemu_pids(h), 60)
        remove_tree(h)  # never through a mount an interrupted build left inside


@contextlib.contextmanager
def raw_api(home: Path, timeout: float = 300) -> Iterator[Any]:
    """An ``httpx.Client`` on the raw API of a home's mvmd socket (what a curl to it does)."""
    import httpx

    transport = httpx.HTTPTransport(uds=str(home / "mvmd.sock"))
    timeouts = httpx.Timeout(timeout, connect=10)
    with httpx.Client(transport=transport, base_url="http://mvmd", timeout=timeouts) as c:
        yield c
