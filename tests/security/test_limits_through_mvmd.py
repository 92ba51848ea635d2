"""Issue 11.2's "limits configurable per sandbox", through mvmd: ``mvmctl up --pids-max
--memory-share`` (the API's ``limits``) reach each command's cgroup in the guest, show in
``ls --json``, and bad values are refused before anything boots."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mvm.api import models as M
from tests.integration.mvmd_home import Ctl, private_home, raw_api

V = f"/{M.API_VERSION}"

pytestmark = [pytest.mark.timeout(900)]

READ = 'd=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat "$d/pids.max" "$d/memory.max" "$d/../memory.max"'


@pytest.fixture(scope="module")
def ctl() -> Iterator[Ctl]:
    with private_home("mvmd-limits-") as h:
        c = Ctl(h)
        c.ok("ls")  # mvmd up, whichever test runs first
        yield c


def test_up_limits_reach_each_commands_cgroup(ctl: Ctl) -> None:
    ctl.ok("up", "--name", "lim", "--pids-max", "40", "--memory-share", "50", timeout=600)
    pids, memory, work = ctl.ok("exec", "lim", "--", "sh", "-c", READ).out.split()
    assert pids == "40"
    # 50 % of the commands' budget (the parent group's memory.max), rounded to a page
    assert int(work) // 2 - 4096 < int(memory) <= int(work) // 2, (memory, work)
    listed = {s["name"]: s for s in ctl.json("ls")}
    assert listed["lim"]["limits"] == {"pids_max": 40, "memory_pct": 50}
    # past the pids limit the command's forks fail (dash exits 2) and the exec ends
    r = ctl("exec", "lim", "--", "sh", "-c", "for i in $(seq 80); do sleep 30 & done; echo done")
    assert (r.rc, r.out, r.err) == (2, "", "sh: 0: Cannot fork\n"), str(r)
    assert ctl.ok("exec", "lim", "--", "echo", "ok").out == "ok\n"  # the sleepers died with it
    ctl.ok("down", "lim")


def test_bad_limits_are_refused_before_booting(ctl: Ctl) -> None:
    r = ctl("up", "--name", "bad", "--pids-max", "0")
    assert r.rc == 2 and "--pids-max" in r.err, str(r)
    with raw_api(ctl.home, timeout=60) as http:
        for limits in ({"pids_max": 0}, {"memory_pct": 101}, {"cpu": 1}):
            resp = http.post(f"{V}/sandboxes", json={"name": "bad", "limits": limits})
            assert resp.status_code == 400, (limits, resp.text)
            assert "limits" in resp.json()["message"], resp.text
    assert "bad" not in {s["name"] for s in ctl.json("ls")}
