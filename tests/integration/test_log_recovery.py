"""Background-process output written while mvmd was down reaches the sandbox log after a
restart (issue 11, item 6), on a real VM behind a private mvmd.

A process prints a numbered line every 0.5 s and another one exits a second after it
starts; mvmd is killed (-9) or stopped right away, so the second one exits while no mvmd
listens and the first keeps printing. After the restart the log holds every line once, in
order, the recovery is marked, and the missed exit has its exit line (after its output)
and exactly one ``proc.exited`` audit record.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mvmd_home import Ctl, pid_alive, private_home, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

TICKER = "i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.5; done"
#: How long mvmd stays down: the scenario (lines written meanwhile), not a synchronisation.
DOWN_FOR = 4.0


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvml-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    return Ctl(home)


def events(ctl: Ctl, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ctl.ok("logs", name, "--json").out.splitlines()]


def ticks(ctl: Ctl, name: str, num: str) -> list[int]:
    found = []
    for ev in events(ctl, name):
        if ev["stream"] == f"proc:{num}:stdout":
            m = re.fullmatch(r"tick(\d+)", ev["message"])
            assert m, ev
            found.append(int(m.group(1)))
    return found


def exited_records(home: Path, sandbox: str, num: str) -> list[dict[str, Any]]:
    recs = []
    for f in (home / "audit").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            data = r.get("data") or {}
            if (
                r.get("event") == "proc.exited"
                and r.get("sandbox") == sandbox
                and str(data.get("proc")) == num
            ):
                recs.append(r)
    return recs


@pytest.mark.parametrize("how", ["kill-9", "daemon-stop"])
def test_lines_and_exits_from_while_mvmd_was_down_reach_the_log(
    ctl: Ctl, home: Path, how: str
) -> None:
    name = f"rec-{how.replace('-', '')}"
    ctl.ok("up", "--name", name, "--ttl", "20m", timeout=300)
    num = ctl.ok("proc", "start", name, "--", "sh", "-c", TICKER).out.strip()
    assert wait_until(lambda: len(ticks(ctl, name, num)) >= 2, 60)
    quick = ctl.ok("proc", "start", name, "--", "sh", "-c", "sleep 1; echo bye; exit 3").out
    quick = quick.strip()
    old = ctl.daemon_pid()
    if how == "kill-9":
        os.kill(old, signal.SIGKILL)
    else:
        ctl.ok("daemon", "stop", timeout=60)
    assert wait_until(lambda: not pid_alive(old), 20)
    time.sleep(DOWN_FOR)

    # The next command starts a new mvmd: it reattaches and recovers from the rings.
    procs = {str(p["proc"]): p for p in ctl.json("proc", "ls", name)}
    assert procs[quick]["running"] is False and procs[quick]["exit_code"] == 3, procs
    assert wait_until(lambda: f"proc {quick} exited with 3" in ctl.ok("logs", name).out, 60)
    in_guest = len(ctl.ok("proc", "output", name, num).out.splitlines())
    assert wait_until(lambda: len(ticks(ctl, name, num)) >= in_guest, 60)
    seen = ticks(ctl, name, num)
    assert seen == list(range(1, len(seen) + 1)), seen  # every line once, in order
    msgs = [(e["stream"], e["message"]) for e in events(ctl, name)]
    assert any(m.startswith(f"recovered: proc {num} stdout") for _, m in msgs), msgs
    bye = msgs.index((f"proc:{quick}:stdout", "bye"))
    exit_line = msgs.index(("mvmd", f"proc {quick} exited with 3"))
    assert bye < exit_line, msgs
    assert len(exited_records(home, name, quick)) == 1
    ctl.ok("down", name)
