"""The cluster front's routing without Ray running: lost hosts, lost sandboxes, names."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray")

from mvm.cluster.front import RoutingUpstream
from mvm.cluster.registry import Host, Registry


def registry() -> Registry:
    reg = Registry("k" * 43)
    for name in ("h1", "h2"):
        reg.hosts[name] = Host(name=name, node_id=name, url=f"http://127.0.0.1:1/{name}")
    reg.set_listing(reg.hosts["h1"], [{"name": "a", "state": "running", "image": "python"}])
    return reg


def test_a_lost_host_reports_its_sandboxes_lost_and_refuses_calls_to_them() -> None:
    reg = registry()
    assert reg.owner == {"a": "h1"}
    reg.mark_lost(reg.hosts["h1"], "host actor died: killed")
    assert not reg.hosts["h1"].alive and "a" not in reg.owner
    up = RoutingUpstream(reg)

    async def go() -> None:
        listed = json.loads(await (await up.open("GET", "/sandboxes", headers={})).read())
        assert listed == [
            {
                "name": "a",
                "state": "lost",
                "image": "python",
                "host": "h1",
                "reason": "host actor died: killed",
            }
        ]
        r = await up.open("POST", "/sandboxes/a/exec", headers={})
        body = json.loads(await r.read())
        assert r.status == 409 and "lost with host h1" in body["message"]
        dup = await up.open("POST", "/sandboxes", data=b'{"name": "a"}', headers={})
        assert dup.status == 409  # a lost name is still taken until forgotten
        gone = await up.open("DELETE", "/sandboxes/a", headers={})
        assert gone.status == 200 and "a" not in reg.lost
        missing = await up.open("GET", "/sandboxes/nope", headers={})
        assert missing.status == 404
        await up.close()

    asyncio.run(go())


def test_no_live_host_means_a_clear_error_not_a_hang() -> None:
    reg = registry()
    for h in list(reg.hosts.values()):
        reg.mark_lost(h, "gone")
    up = RoutingUpstream(reg)

    async def go() -> None:
        r = await up.open("POST", "/sandboxes", data=b'{"name": "b"}', headers={})
        assert r.status == 500 and "no host can take" in json.loads(await r.read())["message"]
        s = await up.open("GET", "/status", headers={})
        assert s.status == 500
        await up.close()

    asyncio.run(go())
