"""mvmd must keep serving while two sandboxes of a new shape boot at once.

The first VM of a shape makes the shape's boot template, under a file lock per template
(``TemplateStore.lock``, a blocking ``fcntl.flock``). In mvmd every create runs on one
event loop, so this module gets its own MVM_HOME with a *private, empty* templates
directory (root filesystems, kernels and initramfs are shared with the default store): both
``up`` calls below then need the same template that does not exist yet.

Bounded: the test polls the daemon while the two ``up`` run and stops as soon as the
daemon has not answered for a while; everything it started is killed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm import paths
from mvm.images.store import ImageStore
from mvm.vmm.qemu import qemu_binary

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]
#: Not templates (see above); image records are copied (they hold absolute paths).
SHARED = ("rootfs", "kernels", "initramfs", "build.lock")


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def started_for(home: Path) -> list[int]:
    """Live mvmd and QEMU processes of this home (found by environment or command line)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        argv0 = os.path.basename(cmd.split(b"\0", 1)[0])
        if (b"qemu" in argv0 and str(home).encode() in cmd) or (
            b"mvm.daemon" in cmd and f"MVM_HOME={home}".encode() in env
        ):
            pids.append(int(p.name))
    return [pid for pid in pids if pid_alive(pid)]


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    if shutil.which(qemu_binary()) is None:
        pytest.skip(f"{qemu_binary()} not found: install qemu-system-x86")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MVM_HOME", raising=False)
        default = paths.home()
    ImageStore(default).ensure("python")
    (default / "build.lock").touch()
    home = Path(tempfile.mkdtemp(prefix="mvmd-", dir="/tmp"))
    for n in SHARED:
        (home / n).symlink_to(default / n)
    (home / "images").mkdir()
    for rec in (default / "images").glob("*.json"):
        shutil.copy(rec, home / "images" / rec.name)
    e = {**os.environ, "MVM_HOME": str(home)}
    e.pop("MVM_RUN_DIR", None)
    try:
        yield e
    finally:
        if daemon_answers(e):  # a hung daemon is killed below
            for args in (["down", "--all"], ["daemon", "stop"]):
                try:
                    subprocess.run(
                        [*MVMCTL, *args], env=e, capture_output=True, timeout=60, check=False
                    )
                except subprocess.TimeoutExpired:
                    pass
        for pid in started_for(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while started_for(home) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(home, ignore_errors=True)


def daemon_answers(env: dict[str, str]) -> bool:
    p = subprocess.run(
        [*MVMCTL, "daemon", "status", "--json"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return p.returncode == 0 and json.loads(p.stdout).get("pid") is not None


def test_two_ups_that_both_need_a_new_template(env: dict[str, str]) -> None:
    start = subprocess.run(
        [*MVMCTL, "daemon", "start"], env=env, capture_output=True, timeout=60, check=False
    )
    assert start.returncode == 0, start.stderr
    ups = [
        subprocess.Popen(
            [*MVMCTL, "up", "--name", name, "--memory", "256", "--ttl", "5m"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("race-a", "race-b")
    ]
    silent = 0
    try:
        deadline = time.monotonic() + 150
        while any(p.poll() is None for p in ups) and time.monotonic() < deadline:
            if daemon_answers(env):  # each try waits up to 5 s for an answer
                silent = 0
            else:
                silent += 1
                if silent >= 2:
                    break
            time.sleep(1)
        assert silent < 2, "mvmd stopped answering while the two sandboxes were created"
        outs = [p.communicate(timeout=60) for p in ups]
        assert [p.returncode for p in ups] == [0, 0], outs
        listing = subprocess.run(
            [*MVMCTL, "ls", "--json"], env=env, capture_output=True, timeout=60, check=True
        )
        states = {s["name"]: s["state"] for s in json.loads(listing.stdout)}
        assert states == {"race-a": "running", "race-b": "running"}
    finally:
        for p in ups:
            if p.poll() is None:
                p.kill()
                p.wait(10)
