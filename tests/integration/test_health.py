"""mvmd's health check and what a dead sandbox says (issue 11, items 3 and 7), on real VMs
behind a private mvmd.

- A frozen VM (QEMU stopped with SIGSTOP) is flagged ``unresponsive`` while staying
  ``running``, and the flag clears once it runs again (SIGCONT).
- ``kill -9`` of a sandbox's QEMU: ``ls`` names the signal, ``logs`` still shows its log
  (console lines and the failure) until ``down`` removes it.
- A QEMU adopted after an mvmd restart that dies: ``ls`` says it vanished.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mvmd_home import Ctl, pid_alive, private_home, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmh-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    return Ctl(home)


def up(ctl: Ctl, name: str) -> dict[str, object]:
    ctl.ok("up", "--name", name, "--ttl", "20m", timeout=300)
    return ctl.sandboxes()[name]


def test_a_frozen_vm_is_flagged_unresponsive_and_recovers(ctl: Ctl) -> None:
    s = up(ctl, "frozen")
    pid = int(str(s["pid"]))
    assert s["unresponsive"] is None
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: ctl.sandboxes()["frozen"]["unresponsive"], 120, 1.0), (
            ctl.sandboxes()["frozen"]
        )
        s = ctl.sandboxes()["frozen"]
        assert s["state"] == "running", s  # a flag, not a state: the guest may come back
        assert "has not answered" in str(s["unresponsive"])
        assert "unresponsive" in ctl.ok("ls").out
        # `wait` waits for an end, and an unresponsive sandbox has not ended
        r = ctl("wait", "frozen", "--timeout", "1s")
        assert r.rc == 124 and "frozen: running" in r.out, str(r)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: ctl.sandboxes()["frozen"]["unresponsive"] is None, 120, 1.0), (
        ctl.sandboxes()["frozen"]
    )
    assert ctl.ok("exec", "frozen", "--", "echo", "ok").out == "ok\n"
    log = ctl.ok("logs", "frozen").out
    assert "unresponsive: the guest agent has not answered" in log
    assert "the guest agent answers again" in log
    ctl.ok("down", "frozen")


def test_the_reaper_and_wait_treat_an_unresponsive_sandbox_as_running(ctl: Ctl) -> None:
    """The flag is not a state: the reaper neither fails an unresponsive sandbox nor
    spares it its TTL, and ``wait`` returns when the TTL ends it, frozen or not."""
    s = up(ctl, "stuck")
    pid = int(str(s["pid"]))
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: ctl.sandboxes()["stuck"]["unresponsive"], 120, 1.0), (
            ctl.sandboxes()["stuck"]
        )
        assert ctl.sandboxes()["stuck"]["state"] == "running"
        ctl.ok("set-ttl", "stuck", "2s")
        r = ctl("wait", "stuck", "--timeout", "120s", timeout=200)
        assert r.rc == 0 and r.out.startswith("stuck: stopped"), str(r)
        assert "stuck" not in ctl.sandboxes()
        assert wait_until(lambda: not pid_alive(pid), 30), "the TTL left the frozen QEMU"
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)


def test_a_killed_qemu_names_the_signal_and_keeps_its_log(ctl: Ctl, home: Path) -> None:
    s = up(ctl, "killed")
    pid, sid = int(str(s["pid"])), str(s["id"])
    ctl.ok("exec", "killed", "--user", "root", "--", "sh", "-c", "echo last-words >/dev/console")
    assert wait_until(lambda: "last-words" in ctl.ok("logs", "killed").out, 30)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: ctl.sandboxes()["killed"]["state"] == "failed", 60), ctl.sandboxes()
    s = ctl.sandboxes()["killed"]
    assert str(s["reason"]).startswith("QEMU killed by signal 9 (SIGKILL)"), s
    assert "QEMU killed by signal 9 (SIGKILL)" in ctl.ok("ls").out
    assert not (home / "run" / sid).exists(), "the failed sandbox's run dir was not removed"
    log = ctl.ok("logs", "killed").out
    assert "failed: QEMU killed by signal 9 (SIGKILL)" in log, log
    assert "last-words" in log, log  # the console tail is still readable
    kept = home / "postmortem" / sid
    assert kept.is_dir()
    ctl.ok("down", "killed")
    assert not kept.exists(), "removing the sandbox must remove its kept log"
    assert ctl("logs", "killed").rc != 0


def test_an_adopted_qemu_that_dies_is_said_to_have_vanished(ctl: Ctl) -> None:
    s = up(ctl, "adopted")
    pid = int(str(s["pid"]))
    old = ctl.daemon_pid()
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(old), 10)
    assert ctl.sandboxes()["adopted"]["state"] == "running"  # a new mvmd adopted it
    assert ctl.daemon_pid() != old
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: ctl.sandboxes()["adopted"]["state"] == "failed", 60), ctl.sandboxes()
    reason = str(ctl.sandboxes()["adopted"]["reason"])
    assert reason.startswith(f"QEMU (pid {pid}, adopted after an mvmd restart) vanished"), reason
    assert "vanished" in ctl.ok("logs", "adopted").out
    ctl.ok("down", "adopted")


def test_a_qemu_killed_while_mvmd_was_down_is_said_to_have_vanished(ctl: Ctl) -> None:
    s = up(ctl, "gone")
    pid = int(str(s["pid"]))
    old = ctl.daemon_pid()
    ctl.ok("daemon", "stop", timeout=60)
    assert wait_until(lambda: not pid_alive(old), 20)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 10)
    s = ctl.sandboxes()["gone"]  # the next command starts mvmd, which finds it gone
    assert s["state"] == "failed", s
    assert str(s["reason"]).startswith(f"QEMU (pid {pid}) vanished while mvmd was down"), s
    assert "vanished while mvmd was down" in ctl.ok("logs", "gone").out
    ctl.ok("down", "gone")
