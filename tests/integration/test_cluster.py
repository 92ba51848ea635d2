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

    def placements(self) -> list[dict[str, Any]]:
        """Every ``cluster.place`` record in the hosts' audit chains (with ``host_home``)."""
        out = []
        for i, home in enumerate(self.homes, 1):
            for f in sorted((home / "audit").rglob("*.jsonl")):
                for line in f.read_text().splitlines():
                    if '"cluster.place"' in line:
                        out.append({**json.loads(line), "host_home": f"h{i}"})
        return out


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
    # One cluster audit record per placement, written by the chosen host's mvmd (the
    # front writes no audit of its own: it is an adapter).
    placed = cl.placements()
    assert {(r["sandbox"], r["data"]["host"], r["host_home"]) for r in placed} >= {
        ("spread1", listed["spread1"]["host"], listed["spread1"]["host"]),
        ("spread2", listed["spread2"]["host"], listed["spread2"]["host"]),
    }
    assert not list((cl.front.home / "audit").rglob("*.jsonl")) or not any(
        '"cluster.place"' in f.read_text() for f in (cl.front.home / "audit").rglob("*.jsonl")
    )
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


def _ticks(cl: Cluster, name: str, proc: int) -> list[int]:
    out = cl.remote.ok("proc", "output", name, str(proc), timeout=300).out
    return [int(x) for x in out.split() if x.isdigit()]


def test_migrate_live_keeps_name_id_file_process_and_forward(cl: Cluster) -> None:
    cl.remote.ok(*UP, "--name", "mover", timeout=600)
    before = cl.ls()["mover"]
    src = before["host"]
    dst = "h2" if src == "h1" else "h1"
    cl.remote.ok("exec", "mover", "--", "sh", "-c", "echo kept > /work/f.txt", timeout=300)
    # A counting process writing to its stdout, and a web server behind a forward.
    loop = "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done"
    proc = int(cl.remote.json("proc", "start", "mover", "--json", "--", "sh", "-c", loop)["proc"])
    web = "cd /work && exec python3 -m http.server 8000"
    cl.remote.ok("proc", "start", "mover", "--", "sh", "-c", web, timeout=300)
    fwd = cl.remote.json("forward", "mover", "8000", timeout=300)
    url = f"http://{fwd['host']}:{fwd['host_port']}/f.txt"
    assert wait_until(lambda: _get(url) == "kept\n", 120)
    assert wait_until(lambda: len(_ticks(cl, "mover", proc)) >= 2, 120)
    # The hosts' migration routes are the cluster's: a token at the front cannot name
    # where a VM's memory goes (mvmd refuses any request relayed for a tenant).
    auth = {"Authorization": f"Bearer {cl.token}"}
    body = {"uri": "tcp:127.0.0.1:9", "key": "0" * 64}
    r = httpx.post(f"{cl.url}/v1/sandboxes/mover/migration/out", json=body, headers=auth)
    assert r.status_code == 403, r.text
    out = json.loads(cl.remote.ok("migrate", "mover", "--to", dst, "--json", timeout=900).out)
    assert out["from"] == src and out["to"] == dst
    assert out["transport"].startswith("qemu migration over tcp, tls")
    assert out["pause_seconds"] is not None and out["pause_seconds"] >= 0
    assert out["total_seconds"] >= out["pause_seconds"] and out["transferred_bytes"] > 0
    after = cl.ls()["mover"]
    assert after["host"] == dst and after["state"] == "running"
    assert after["id"] == before["id"] and out["same_id"]  # the name and the id stay
    assert "mover" not in cl.host(src)["sandboxes"]
    assert "mover" in cl.host(dst)["sandboxes"]
    assert cl.remote.sh("mover", "cat /work/f.txt", timeout=300).out.strip() == "kept"
    # The same process (same id), its output going on from where it was on the old host.
    seen = _ticks(cl, "mover", proc)
    assert seen == list(range(1, len(seen) + 1)), seen[:20]  # no restart, no gap
    assert wait_until(lambda: len(_ticks(cl, "mover", proc)) > len(seen), 120)
    # The forward was re-created on the new host (same port: the old host let it go).
    assert [f["guest_port"] for f in out["forwards"]] == [8000], out
    new = out["forwards"][0]
    listed = cl.remote.json("forward", "mover", "--list", timeout=120)
    assert [(f["host_port"], f["guest_port"]) for f in listed] == [(new["host_port"], 8000)]
    assert _get(f"http://{new['host']}:{new['host_port']}/f.txt") == "kept\n"
    # Audit on both hosts: the source removed it as migrated, the destination took it in.
    hs, hd = (cl.homes[int(h[1]) - 1] for h in (src, dst))
    assert "migrated to" in _audit_text(hs) and '"sandbox.migrated_in"' in _audit_text(hd)
    cl.remote.ok("down", "mover", timeout=300)


def _get(url: str) -> str | None:
    try:
        r = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


def _audit_text(home: Path) -> str:
    return "".join(f.read_text() for f in sorted((home / "audit").rglob("*.jsonl")))


def test_a_migration_stream_with_the_wrong_key_is_refused_and_the_source_runs_on(
    cl: Cluster,
) -> None:
    cl.remote.ok(*UP, "--name", "keyed", timeout=600)
    src = cl.ls()["keyed"]["host"]
    dst = "h2" if src == "h1" else "h1"
    (name,) = [n for n in cl.host(src)["sandboxes"] if n.endswith("keyed")]

    def mvmd(host: str) -> httpx.Client:  # the host's own mvmd, as its owner
        sock = cl.homes[int(host[1]) - 1] / "mvmd.sock"
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=600)

    base = f"http://mvmd/v1/sandboxes/{name}/migration"
    with mvmd(src) as s, mvmd(dst) as d:
        plan = s.get(f"{base}/plan").json()
        body = {"plan": plan, "listen": "127.0.0.1", "key": "a" * 64}
        got = d.post(f"{base}/in", json=body)
        assert got.status_code == 201, got.text
        uri = f"tcp:127.0.0.1:{got.json()['port']}"
        out = s.post(f"{base}/out", json={"uri": uri, "key": "b" * 64})
        assert out.status_code >= 400 and "migration" in out.text, out.text
        assert d.post(f"{base}/in/abort").status_code == 200
    assert cl.ls()["keyed"]["host"] == src and cl.ls()["keyed"]["state"] == "running"
    assert cl.remote.sh("keyed", "echo still here", timeout=300).out.strip() == "still here"
    assert "keyed" not in str(cl.host(dst)["sandboxes"])
    cl.remote.ok("down", "keyed", timeout=300)


def test_a_create_a_host_refuses_is_retried_on_the_other(cl: Cluster) -> None:
    # h1's own admission refuses 512 MiB sandboxes (its mvmd re-reads policy.toml).
    pol = cl.homes[0] / "policy.toml"
    pol.write_text("max_memory_mb = 256\n")
    try:
        for name in ("retry1", "retry2"):  # spread: the second one tries h1 first
            cl.remote.ok(*UP, "--name", name, "--memory", "512", timeout=600)
            assert cl.ls()[name]["host"] == "h2"
        tries = [r for r in cl.placements() if r["sandbox"] in ("retry1", "retry2")]
        assert {r["data"]["host"] for r in tries} == {"h2"}
        failed = [f for r in tries for f in r["data"]["failed"]]
        assert failed and {f["host"] for f in failed} == {"h1"}, tries
        assert all("403" in f["error"] for f in failed)
        denied = _audit_text(cl.homes[0])
        assert '"plan.denied"' in denied and "max_memory_mb" in denied
    finally:
        pol.unlink(missing_ok=True)
        for name in ("retry1", "retry2"):
            cl.remote("down", name, timeout=300)


def test_the_e2b_face_through_the_front(cl: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    e2b = pytest.importorskip("e2b")
    tok = cl.front.json("token", "create", "--tenant", "acme", timeout=60)
    for k in ("E2B_API_URL", "E2B_SANDBOX_URL"):
        monkeypatch.setenv(k, cl.url)
    monkeypatch.setenv("E2B_API_KEY", tok["token"])
    s = e2b.Sandbox.create("python-3.11", timeout=1800)
    try:
        s.files.write("/tmp/e2b.txt", "through the front\n")
        r = s.commands.run("cat /tmp/e2b.txt; uname -s")
        assert r.exit_code == 0 and r.stdout.split("\n")[:2] == ["through the front", "Linux"]
        assert s.sandbox_id in {x.sandbox_id for x in e2b.Sandbox.list().next_items()}
        # Placed on one host, in the tenant's namespace there; recorded by that host.
        on = [h["name"] for h in cl.status()["hosts"] if any(
            s.sandbox_id in n for n in h["sandboxes"])]  # fmt: skip
        assert len(on) == 1, cl.status()
        assert any(s.sandbox_id in str(r["sandbox"]) for r in cl.placements())
        # The tenant moves it live; the E2B face follows it to the new host.
        to = "h2" if on == ["h1"] else "h1"
        r = httpx.post(
            f"{cl.url}/v1/sandboxes/{s.sandbox_id}/migrate",
            params={"to": to},
            headers={"Authorization": f"Bearer {tok['token']}"},
            timeout=900,
        )
        assert r.status_code == 200 and r.json()["to"] == to, r.text
        assert s.commands.run("cat /tmp/e2b.txt").stdout == "through the front\n"
        assert any(s.sandbox_id in n for n in cl.host(to)["sandboxes"])
    finally:
        s.kill()
    assert s.sandbox_id not in {x.sandbox_id for x in e2b.Sandbox.list().next_items()}


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
