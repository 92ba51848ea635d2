"""The stdlib HTTP client mvmctl uses on mvmd's socket, against a real aiohttp server (the
one mvmd runs) and against arbitrary bytes (a broken peer must give TransportError only)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm import transport as tp


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "len": len(body),
            "ctype": request.headers.get("content-type", ""),
        }
    )


async def _lines(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
    await resp.prepare(request)
    for i in range(int(request.query.get("n", "3"))):
        await resp.write(b'{"i": %d}\n' % i)
        await asyncio.sleep(0)
    await resp.write(b'{"last": true}')  # no final newline
    await resp.write_eof()
    return resp


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=bytes(range(256)) * 8192)  # 2 MiB


async def _missing(request: web.Request) -> web.Response:
    return web.json_response({"error": "not_found"}, status=404)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("uds") / "s.sock")
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/v1/echo/{rest:.*}", _echo)
    app.router.add_get("/v1/lines", _lines)
    app.router.add_get("/v1/big", _big)
    app.router.add_get("/v1/missing", _missing)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, path).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield path
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def transport(path: str) -> tp.UnixTransport:
    return tp.UnixTransport(path, "/v1", 10.0, 5.0)


def test_json_request_with_params_and_body(server: str) -> None:
    resp = transport(server).request(
        "POST",
        "/echo/a%2Fb",
        content=b"x" * 1000,
        params={"path": "/work/a b&c", "n": 3},
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 200
    import json

    got = json.loads(resp.content)
    assert got["method"] == "POST"
    assert got["path"] == "/v1/echo/a/b"
    assert got["query"] == {"path": "/work/a b&c", "n": "3"}
    assert got["len"] == 1000
    assert got["ctype"] == "application/json"


def test_chunked_stream_lines(server: str) -> None:
    with transport(server).open("GET", "/lines", params={"n": 50}) as resp:
        lines = list(resp.iter_lines())
    assert lines[:2] == [b'{"i": 0}', b'{"i": 1}']
    assert len(lines) == 51 and lines[-1] == b'{"last": true}'


def test_big_body_is_read_whole(server: str) -> None:
    assert transport(server).request("GET", "/big").content == bytes(range(256)) * 8192


def test_error_status_keeps_its_body(server: str) -> None:
    resp = transport(server).request("GET", "/missing")
    assert resp.status_code == 404 and b"not_found" in resp.content


def test_no_server_is_connect_failed(tmp_path: Path) -> None:
    with pytest.raises(tp.ConnectFailed):
        transport(str(tmp_path / "none.sock")).request("GET", "/status")


def test_bad_target_is_refused(server: str) -> None:
    with pytest.raises(tp.TransportError):
        transport(server).request("GET", "/echo/x", headers={"x": "a\r\nInjected: 1"})


def _response_from(raw: bytes) -> bytes:
    a, b = socket.socketpair()
    try:
        a.settimeout(2.0)
        b.sendall(raw)
        b.shutdown(socket.SHUT_WR)
        resp = tp._read_head(a)
        return resp.read()
    finally:
        a.close()
        b.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_give_transport_error_only(raw: bytes) -> None:
    """Anything but TransportError fails; bytes without an HTTP/1.x status line are always
    refused, and what is accepted had a whole head (an empty line after the status line)."""
    if not raw.startswith(b"HTTP/1."):
        with pytest.raises(tp.TransportError):
            _response_from(raw)
        return
    try:
        _response_from(raw)
    except tp.TransportError:
        return
    assert b"\n\r\n" in raw, raw


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_chunked_bodies_round_trip(parts: list[bytes]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        raw += b"%x\r\n" % len(p) + p + b"\r\n"
    raw += b"0\r\n\r\n"
    assert _response_from(raw) == b"".join(parts)
