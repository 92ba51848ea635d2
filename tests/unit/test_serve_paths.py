"""The native relay refuses path segments that could escape the tenant's sandbox after
its name is mapped (no VM: mvmd is never reached for these)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mvm.serve.app import Server
from mvm.serve.upstream import Upstream
from mvm.tokens import TokenStore

BAD = [
    "/v1/sandboxes/web/../../shutdown",
    "/v1/sandboxes/web/%2e%2e/%2e%2e/shutdown",
    "/v1/sandboxes/web/..%2f..%2fshutdown",
    "/v1/sandboxes/web/files%3Fpath=/etc",
    "/v1/sandboxes//files",
    "/v1/shutdown",
]


@pytest.mark.parametrize("path", BAD)
def test_escaping_paths_are_404_before_mvmd(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    tokens = TokenStore(tmp_path / "tokens")
    plain, _ = tokens.create("acme")
    dead = Upstream(str(tmp_path / "no-mvmd.sock"), autostart=False)  # mvmd would be a 500

    async def main() -> int:
        async with TestClient(TestServer(Server(dead, tokens).app())) as c:
            r = await c.post(path, headers={"Authorization": f"Bearer {plain}"})
            return r.status

    assert asyncio.run(main()) == 404


def test_a_missing_mvmd_is_an_error_body_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    tokens = TokenStore(tmp_path / "tokens")
    plain, _ = tokens.create("acme")
    dead = Upstream(str(tmp_path / "no-mvmd.sock"), autostart=False)

    async def main() -> tuple[int, dict[str, object]]:
        async with TestClient(TestServer(Server(dead, tokens).app())) as c:
            r = await c.get("/v1/sandboxes/web", headers={"Authorization": f"Bearer {plain}"})
            return r.status, await r.json()

    status, body = asyncio.run(main())
    assert status == 500 and body["message"] == "mvmd is not answering"
