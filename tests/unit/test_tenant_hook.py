"""mvmd's tenant hook: relayed requests touch only the tenant's names and audit into its chain."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mvm import audit, tenancy
from mvm.daemon.server import errors_middleware
from mvm.daemon.tenant_hook import ACTOR_HEADER, TENANT_HEADER, tenant_middleware


async def _handler(request: web.Request) -> web.Response:
    return web.json_response(
        {"id": audit.record("probe.touched", sandbox=request.match_info["name"])}
    )


def test_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_TENANT", raising=False)
    mine = tenancy.to_service("acme", "web")

    async def main() -> list[int]:
        app = web.Application(middlewares=[errors_middleware, tenant_middleware])
        app.router.add_get("/s/{name}", _handler)
        async with TestClient(TestServer(app)) as c:
            h = {TENANT_HEADER: "acme", ACTOR_HEADER: "t0123456789ab"}
            codes = [(await c.get(f"/s/{mine}", headers=h)).status]
            codes.append(
                (await c.get(f"/s/{tenancy.to_service('other', 'web')}", headers=h)).status
            )
            codes.append((await c.get("/s/plain", headers=h)).status)
            codes.append((await c.get("/s/plain")).status)  # the owner: no headers
            bad = {TENANT_HEADER: "../x", ACTOR_HEADER: "t1"}
            codes.append((await c.get(f"/s/{mine}", headers=bad)).status)
            return codes

    assert asyncio.run(main()) == [200, 404, 404, 200, 400]
    acme = [json.loads(x) for x in (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()]
    assert [(r["tenant"], r["actor"], r["sandbox"]) for r in acme] == [
        ("acme", "t0123456789ab", mine)
    ]
    owner = [json.loads(x) for x in (tmp_path / "audit" / "default.jsonl").read_text().splitlines()]
    assert [(r["tenant"], r["actor"]) for r in owner] == [("default", "mvmd")]


def test_a_tenant_may_have_its_own_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.audit.log import acting_for
    from mvm.policy.admission import load_policy

    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_POLICY", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "acme.toml").write_text("max_memory_mb = 256\n")
    assert load_policy().max_memory_mb == 8192
    with acting_for("acme", "t1"):
        assert load_policy().max_memory_mb == 256
    with acting_for("other", "t2"):
        assert load_policy().max_memory_mb == 8192  # no file: the host's policy


def test_the_owner_may_name_its_actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``X-Mvm-Actor`` without a tenant (the owner's own socket): mvmd's records name it."""
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_TENANT", raising=False)

    async def main() -> list[int]:
        app = web.Application(middlewares=[errors_middleware, tenant_middleware])
        app.router.add_get("/s/{name}", _handler)
        async with TestClient(TestServer(app)) as c:
            codes = [(await c.get("/s/web", headers={ACTOR_HEADER: "mcp:claude"})).status]
            codes.append((await c.get("/s/web", headers={ACTOR_HEADER: "a b"})).status)
            codes.append((await c.get("/s/web")).status)
            return codes

    assert asyncio.run(main()) == [200, 400, 200]
    owner = [json.loads(x) for x in (tmp_path / "audit" / "default.jsonl").read_text().splitlines()]
    assert [(r["tenant"], r["actor"]) for r in owner] == [
        ("default", "mcp:claude"),
        ("default", "mvmd"),
    ]


def test_the_client_labels_its_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm import client
    from mvm.errors import InvalidArgument

    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_URL", raising=False)
    monkeypatch.delenv(client.ACTOR_ENV, raising=False)

    def sent(c: client.Client) -> str | None:
        return c._label({"content-type": "application/json"}).get(client.ACTOR_HEADER)

    assert sent(client.Client()) is None
    assert sent(client.Client(actor="alice")) == "alice"
    monkeypatch.setenv(client.ACTOR_ENV, "ci-bot")
    c = client.Client()
    assert sent(c) == "ci-bot"
    with client.acting_as("mcp:agent"):
        assert sent(c) == "mcp:agent"

        async def in_thread() -> str | None:
            return await asyncio.to_thread(sent, c)

        assert asyncio.run(in_thread()) == "mcp:agent"
    assert sent(c) == "ci-bot"
    with pytest.raises(InvalidArgument):
        client.Client(actor="no spaces")
