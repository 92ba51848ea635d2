"""Unit tests for fixes found by the security suite (tests/security): pure parts only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mvm.agent.client import NAME_MAX, bad_entry_name
from mvm.cli.ui import safe_text


def test_names_no_directory_can_hold_are_refused() -> None:
    for name in ("", ".", "..", "../../etc/passwd", "a/b", "/", "a\x00b", "x" * (NAME_MAX + 1)):
        assert bad_entry_name(name) is not None, name


def test_odd_but_legal_names_pass() -> None:
    for name in ("a", "...", ".hidden", "\x1b[2J", "sp ace", "é" * 127, "x" * NAME_MAX, "\udcff"):
        assert bad_entry_name(name) is None, name


@given(st.text(min_size=1, max_size=300))
def test_agrees_with_what_a_linux_directory_can_hold(name: str) -> None:
    raw = name.encode("utf-8", "surrogatepass")
    legal = name not in (".", "..") and "/" not in name and "\x00" not in name
    legal = legal and len(raw) <= NAME_MAX
    assert (bad_entry_name(name) is None) == legal
    if legal:  # joining it to a directory cannot climb out of that directory
        assert os.path.basename(name) == name
        assert os.path.normpath(os.path.join("/d", name)).startswith("/d/")


# ----------------------------------------------------------------------------- mvmd errors


def _http_errors() -> dict[str, tuple[int, str, dict[str, object]]]:
    """aiohttp's own refusals through mvmd's error middleware (a tiny app, no VM)."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from mvm.daemon.server import errors_middleware

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def run() -> dict[str, tuple[int, str, dict[str, object]]]:
        app = web.Application(middlewares=[errors_middleware], client_max_size=100)
        app.router.add_post("/v1/echo", echo)
        out = {}
        async with TestClient(TestServer(app)) as c:
            for key, method, path, body in (
                ("route", "GET", "/v1/no/such/route", b""),
                ("method", "GET", "/v1/echo", b""),
                ("size", "POST", "/v1/echo", b"x" * 1000),
                ("fine", "POST", "/v1/echo", b"{}"),
            ):
                r = await c.request(method, path, data=body)
                ctype = r.headers.get("content-type", "")
                out[key] = (r.status, ctype, await r.json() if "json" in ctype else {})
        return out

    return asyncio.run(run())


def test_unknown_routes_wrong_methods_and_big_bodies_get_json_errors() -> None:
    got = _http_errors()
    for key, status in (("route", 404), ("method", 405), ("size", 413)):
        code, ctype, body = got[key]
        assert code == status and ctype.startswith("application/json"), got[key]
        assert body["error"] == "InvalidArgument" and str(status) in str(body["message"])
        assert body["data"] == {"status": status}
    assert "limited to" in str(got["size"][2]["hint"])
    assert got["fine"][0] == 200


# ----------------------------------------------------------------------------- handshake


def test_a_guest_answering_every_hello_wrongly_cannot_make_the_host_spin() -> None:
    """Each wrong-nonce answer costs the host a pause before the next hello: a lying
    guest gets a few hellos per second, not thousands, and the handshake still ends."""
    from mvm.agent import protocol as P
    from mvm.agent.client import HELLO_RETRY_PAUSE
    from mvm.errors import CommandTimeout
    from tests.unit.test_agent_client import Guest, run_scenario

    window = 0.5

    async def liar(g: Guest) -> None:
        while True:
            req = await g.recv()
            await g.reply(req, version=P.PROTOCOL_VERSION, nonce="0" * 16)

    async def handshake(agent: object) -> BaseException | None:
        try:
            await agent.hello(window)  # type: ignore[attr-defined]
        except CommandTimeout as exc:
            return exc
        return None

    err, _, guest = run_scenario(liar, handshake)
    assert isinstance(err, CommandTimeout)
    hellos = [f for f in guest.received if f.type == P.HELLO]
    assert 1 <= len(hellos) <= window / HELLO_RETRY_PAUSE + 2, len(hellos)


# ----------------------------------------------------------------------------- CLI output


def test_guest_names_cannot_drive_the_terminal() -> None:
    assert safe_text("\x1b]0;pwned\x07\x1b[2J") == "\\x1b]0;pwned\\x07\\x1b[2J"
    assert safe_text("a\nb\rc\x9bd\x7f") == "a\\x0ab\\x0dc\\x9bd\\x7f"
    assert safe_text("résumé ✓ plain.txt") == "résumé ✓ plain.txt"


@given(st.text(max_size=50))
def test_safe_text_leaves_no_control_character(text: str) -> None:
    import unicodedata

    out = safe_text(text)
    assert not any(unicodedata.category(c) == "Cc" for c in out)
    if not any(unicodedata.category(c) == "Cc" for c in text):
        assert out == text


# ----------------------------------------------------------------------------- mvmd restart


def test_mvmd_reattaches_all_sandboxes_at_once(tmp_path: Path, monkeypatch: Any) -> None:
    """One stalled handshake must not hold up the others: every reattach is in flight
    before any of them finishes."""
    import asyncio

    from mvm.service.sandboxes import Sandboxes

    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    records = [f"rec-{i}" for i in range(5)]
    active = {"now": 0, "max": 0}

    class Records:
        def all(self) -> list[str]:
            return records

    class FakeCore:
        def __init__(self) -> None:
            self.db = Records()
            self.live: dict[str, object] = {}

    async def reattach(self: Sandboxes, rec: str) -> None:
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        for _ in range(3):
            await asyncio.sleep(0)
        active["now"] -= 1

    async def run() -> None:
        monkeypatch.setattr(Sandboxes, "_reattach", reattach)
        monkeypatch.setattr(Sandboxes, "_reap_forever", lambda self: asyncio.sleep(0))
        m = Sandboxes(FakeCore(), None)  # type: ignore[arg-type]
        await m.start()
        assert m.ready.is_set()  # the API stops holding requests only now
        assert m._reaper is not None
        await m._reaper

    asyncio.run(run())
    assert active["max"] == len(records)
