"""The native relay maps the names in fork and restore-as bodies to the tenant's (a child
outside the tenant's namespace would be someone else's); mvmd refuses one anyway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mvm import tenancy
from mvm.serve.app import Server
from mvm.serve.upstream import Upstream
from mvm.tokens import TokenStore


def test_fork_and_restore_as_children_get_the_tenants_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    tokens = TokenStore(tmp_path / "tokens")
    plain, rec = tokens.create("acme")
    seen: list[tuple[str, dict[str, Any], str, str]] = []

    async def record(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        h = request.headers
        seen.append((request.path, body, h["X-Mvm-Tenant"], h["X-Mvm-Actor"]))
        return web.json_response({"ok": True}, status=201)

    async def main() -> list[int]:
        fake = web.Application()
        fake.router.add_post("/v1/sandboxes/{name}/fork", record)
        fake.router.add_post("/v1/sandboxes/{name}/snapshots/{snap}/restore-as", record)
        runner = web.AppRunner(fake)
        await runner.setup()
        sock = str(tmp_path / "mvmd.sock")
        await web.UnixSite(runner, sock).start()
        try:
            up = Upstream(sock, autostart=False)
            async with TestClient(TestServer(Server(up, tokens).app())) as c:
                h = {"Authorization": f"Bearer {plain}"}
                a = await c.post(
                    "/v1/sandboxes/web/fork", json={"name": "kid", "count": 2}, headers=h
                )
                b = await c.post(
                    "/v1/sandboxes/web/snapshots/s1/restore-as", json={"name": "copy"}, headers=h
                )
                return [a.status, b.status]
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == [201, 201]
    web_ = tenancy.to_service("acme", "web")
    assert seen == [
        (
            f"/v1/sandboxes/{web_}/fork",
            {"name": tenancy.to_service("acme", "kid"), "count": 2},
            "acme",
            rec.id,
        ),
        (
            f"/v1/sandboxes/{web_}/snapshots/s1/restore-as",
            {"name": tenancy.to_service("acme", "copy")},
            "acme",
            rec.id,
        ),
    ]


def test_mvmd_refuses_a_tenants_sandbox_outside_its_namespace() -> None:
    from mvm.audit.log import acting_for
    from mvm.errors import PolicyDenied
    from mvm.service.core import new_record

    with acting_for("acme", "t0123456789ab"), pytest.raises(PolicyDenied):
        new_record({"image": "python"}, vm_id="v", name="plain", image_id="i", ttl_seconds=60)
    with acting_for("acme", "t0123456789ab"):
        ok = tenancy.to_service("acme", "kid")
        assert new_record({"image": "python"}, vm_id="v", name=ok, image_id="i", ttl_seconds=60)
