"""`mvmctl cluster`: a real local Ray cluster of two simulated hosts, each its own mvmd in
its own MVM_HOME (images shared), and the front driven by remote `mvmctl` (MVM_URL +
MVM_TOKEN) — placement, routing, tokens, failover and rejoin against real VMs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.mvmd_home import SHARED, Ctl, pid_alive, private_home, wait_until

pytest.importorskip("ray")
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]
UP = ("up", "--image", "python-3.11", "--ttl", "30m")
NO_ROOTFS = tuple(n for n in SHARED if n != "rootfs")


@dataclass
class Cluster:
    front: Ctl  # `mvmctl cluster ...` (the front's home: tokens, cluster audit)
    remote: Ctl  # `mvmctl` against the front (MVM_URL + MVM_TOKEN)
    url: str
    token: str
    homes: list[Path]

    def status(self) -> dict[str, Any]:
        return dict(self.front.json("cluster", "status", timeout=120))

    def host(self, name: str) -> dict[str, Any]:
        return next(h for h in self.status()["hosts"] if h["name"] == name)

    def ls(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.remote.json("ls", timeout=120)}


@pytest.fixture(scope="module")
def cl() -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        front_home = stack.enter_context(private_home("mvcf-"))
        homes = [
            stack.enter_context(private_home("mvch1-")),
            # h2 keeps its own root filesystems: an image copied to it lands there.
            stack.enter_context(private_home("mvch2-", share=NO_ROOTFS)),
        ]
        front = Ctl(front_home)
        args = ["cluster", "up", "--local-hosts", "2"]
        for h in homes:
            args += ["--host-home", str(h)]
        up = front.json(*args, timeout=900)
        try:
            remote = Ctl(front_home)
            remote.env.update(MVM_URL=up["url"], MVM_TOKEN=up["token"])
            assert sorted(up["hosts"]) == ["h1", "h2"]
            yield Cluster(front, remote, up["url"], up["token"], homes)
        finally:
            front("cluster", "down", timeout=600)


def test_two_creates_land_on_different_hosts_and_calls_are_routed(cl: Cluster) -> None:
    cl.remote.ok(*UP, "--name", "spread1", timeout=600)
    cl.remote.ok(*UP, "--name", "spread2", timeout=600)
    listed = cl.ls()
    assert {listed["spread1"]["host"], listed["spread2"]["host"]} == {"h1", "h2"}
    for name in ("spread1", "spread2"):
        r = cl.remote.sh(name, f"echo {name} > /work/who; cat /work/who", timeout=300)
        assert r.rc == 0 and r.out.strip() == name, str(r)
    assert "HOST" in cl.remote.ok("ls", timeout=120).out
    dup = cl.remote(*UP, "--name", "spread1", timeout=300)  # cluster-wide names
    assert dup.rc != 0 and "exists" in dup.err, str(dup)
    # One cluster audit record per placement, in the front's own chain.
    text = "".join(p.read_text() for p in (cl.front.home / "audit").glob("*.jsonl"))
    placed = [json.loads(x) for x in text.splitlines() if '"cluster.place"' in x]
    assert {(r["sandbox"], r["data"]["host"]) for r in placed} >= {
        ("spread1", listed["spread1"]["host"]),
        ("spread2", listed["spread2"]["host"]),
    }
    for name in ("spread1", "spread2"):
        cl.remote.ok("down", name, timeout=300)
    assert not {"spread1", "spread2"} & set(cl.ls())


def test_a_bad_token_gets_401(cl: Cluster) -> None:
    for headers in ({}, {"Authorization": "Bearer mvm_nope_nope"}, {"X-API-Key": "x"}):
        r = httpx.get(f"{cl.url}/v1/sandboxes", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json() == {"code": 401, "message": "unauthorized"}
    bad = Ctl(cl.front.home)
    bad.env.update(MVM_URL=cl.url, MVM_TOKEN="mvm_t000000000000_wrong")
    assert bad("ls", timeout=60).rc != 0
    ok = httpx.get(f"{cl.url}/v1/cluster/status", headers={"Authorization": f"Bearer {cl.token}"})
    assert ok.status_code == 200


def test_a_dead_host_loses_its_sandboxes_placement_continues_and_it_rejoins(
    cl: Cluster,
) -> None:
    cl.remote.ok(*UP, "--name", "victim", timeout=600)
    dead = cl.ls()["victim"]["host"]
    other = "h2" if dead == "h1" else "h1"
    h = cl.host(dead)
    try:
        for pid in (h["actor_pid"], h["mvmd_pid"]):  # the actor first: it restarts mvmd
            os.kill(int(pid), signal.SIGKILL)
            assert wait_until(lambda p=int(pid): not pid_alive(p), 30)
        assert wait_until(lambda: not cl.host(dead)["alive"], 120), cl.status()
        victim = cl.ls()["victim"]
        assert victim["state"] == "lost" and victim["host"] == dead
        assert "died" in victim["reason"], victim
        r = cl.remote.sh("victim", "true", timeout=120)
        assert r.rc != 0 and "lost with host" in r.err, str(r)
        for name in ("after1", "after2"):  # nothing new goes to the lost host
            cl.remote.ok(*UP, "--name", name, timeout=600)
            assert cl.ls()[name]["host"] == other
    finally:
        cl.front.ok("cluster", "rejoin", dead, timeout=600)
    assert cl.host(dead)["alive"]
    # The VM outlived its daemon: the new mvmd reattached it, and it answers again.
    assert wait_until(lambda: cl.ls()["victim"]["state"] == "running", 120), cl.ls()["victim"]
    assert cl.remote.sh("victim", "echo back", timeout=300).out.strip() == "back"
    for name in ("victim", "after1", "after2"):
        cl.remote.ok("down", name, timeout=300)


def test_migrate_keeps_the_name_a_file_and_a_running_process(cl: Cluster) -> None:
    cl.remote.ok(*UP, "--name", "mover", timeout=600)
    src = cl.ls()["mover"]["host"]
    dst = "h2" if src == "h1" else "h1"
    cl.remote.ok("exec", "mover", "--", "sh", "-c", "echo kept > /work/f.txt", timeout=300)
    loop = "i=0; while true; do i=$((i+1)); echo $i > /tmp/tick; sleep 1; done"
    cl.remote.ok("proc", "start", "mover", "--", "sh", "-c", loop, timeout=300)
    assert wait_until(lambda: cl.remote.sh("mover", "cat /tmp/tick").out.strip() != "", 120)
    out = json.loads(cl.remote.ok("migrate", "mover", "--to", dst, "--json", timeout=900).out)
    assert out["from"] == src and out["to"] == dst and out["pause_seconds"] > 0
    assert out["total_seconds"] >= out["pause_seconds"]
    assert cl.ls()["mover"]["host"] == dst and cl.ls()["mover"]["state"] == "running"
    assert "mover" not in cl.host(src)["sandboxes"]
    assert cl.remote.sh("mover", "cat /work/f.txt", timeout=300).out.strip() == "kept"
    # The same loop, still counting on the new host (its count went on from before).
    before = int(cl.remote.sh("mover", "cat /tmp/tick", timeout=300).out)
    assert wait_until(lambda: int(cl.remote.sh("mover", "cat /tmp/tick").out or 0) > before, 120)
    cl.remote.ok("down", "mover", timeout=300)


def test_an_image_a_host_lacks_is_copied_to_it_verified_and_runs(cl: Cluster) -> None:
    records = cl.homes[1] / "images"
    img = json.loads((records / "python-3.11.json").read_text())
    for rec in records.glob("*.json"):  # h2 forgets the image (and its aliases)
        if json.loads(rec.read_text()).get("id") == img["id"]:
            rec.unlink()
    assert wait_until(lambda: "python-3.11" not in cl.host("h2")["capacity"]["images"], 120)
    r = httpx.post(
        f"{cl.url}/v1/sandboxes",
        params={"host": "h2"},
        json={"name": "imgcopy", "image": "python-3.11", "ttl_seconds": 1800},
        headers={"Authorization": f"Bearer {cl.token}"},
        timeout=900,
    )
    assert r.status_code == 201, r.text
    assert cl.ls()["imgcopy"]["host"] == "h2"
    copied = Path(json.loads((records / "python-3.11.json").read_text())["rootfs"])
    assert copied.parent == cl.homes[1] / "rootfs" and not copied.is_symlink()
    h = hashlib.sha256()
    with copied.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == img["rootfs_sha256"]
    assert cl.remote.sh("imgcopy", "echo ran", timeout=300).out.strip() == "ran"
    cl.remote.ok("down", "imgcopy", timeout=300)
