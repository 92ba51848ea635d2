"""The egress proxy's per-connection limits, driven over loopback with short limits.

The real ``EgressProxy`` serves its Unix socket; a client speaks CONNECT to it as the
guest's relay would, and a local server stands in for the internet. The proxy refuses
loopback addresses (they are never reachable from a sandbox), so these tests let
``address_refusal`` pass 127.0.0.1 — the one part not under test here (it has its own
tests in test_network_policy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mvm import audit
from mvm.daemon import egress as E
from mvm.daemon import egress_splice as S
from mvm.daemon.egress_splice import Limits
from mvm.errors import InvalidArgument
from mvm.policy import network as N

BOUND = 30.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """An upstream that sends forever (until the proxy goes away)."""
    with contextlib.suppress(OSError):
        while True:
            w.write(b"z" * 65536)
            await w.drain()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    w.close()


def limit_records() -> list[dict[str, Any]]:
    return [r for r in audit.default_log().records() if r.get("event") == "egress.limit"]


def run_proxy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Handler,
    limits: Limits,
    body: Callable[[E.EgressProxy, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> E.EgressProxy:
    """Start the proxy and ``upstream``; open one CONNECT through it; run ``body``."""
    monkeypatch.setenv("MVM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MVM_AUDIT_FSYNC", "0")
    monkeypatch.setattr(N, "address_refusal", lambda addr, own=(): None)

    async def main() -> E.EgressProxy:
        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        policy = N.make_policy("none", [f"up.test:{port}"])
        resolver = E.Resolver({"up.test": [ipaddress.ip_address("127.0.0.1")]})
        sock = tmp_path / "egress.sock"
        proxy = E.EgressProxy("sb-1", policy, sock, resolver=resolver, limits=limits)
        await proxy.start()
        try:
            async with asyncio.timeout(BOUND):
                r, w = await asyncio.open_unix_connection(str(sock))
                w.write(f"CONNECT up.test:{port} HTTP/1.1\r\n\r\n".encode())
                await w.drain()
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                await body(proxy, r, w)
                w.close()
                while proxy.active:  # the proxy has finished with the connection
                    await asyncio.sleep(0.01)
        finally:
            await proxy.close()
            server.close()
        return proxy

    return asyncio.run(main())


def test_byte_cap_ends_the_connection_and_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = 300_000

    async def body(p: E.EgressProxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = await r.read(-1)  # to EOF: the proxy cut the endless stream
        assert len(got) == cap  # exactly what fits under the cap was passed on

    proxy = run_proxy(tmp_path, monkeypatch, endless, Limits(max_bytes=cap), body)
    assert proxy.limited == {"bytes": 1, "time": 0, "idle": 0}
    (rec,) = limit_records()
    assert rec["sandbox"] == "sb-1"
    assert rec["data"]["limit"] == "bytes" and rec["data"]["max"] == cap
    assert rec["data"]["bytes"] == cap and rec["data"]["host"] == "up.test"
    assert audit.verify().ok


def test_byte_cap_counts_both_directions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(p: E.EgressProxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"a" * 600)  # 600 up + 600 echoed back > 1000
        await w.drain()
        got = await r.read(-1)
        assert len(got) == 400

    proxy = run_proxy(tmp_path, monkeypatch, echo, Limits(max_bytes=1000), body)
    assert proxy.limited["bytes"] == 1
    assert [x["data"]["bytes"] for x in limit_records()] == [1000]


def test_time_cap_ends_a_busy_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes keep moving (so idle never fires); the total-time cap still ends it."""

    async def body(p: E.EgressProxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await r.read(65536):
            pass

    proxy = run_proxy(
        tmp_path, monkeypatch, endless, Limits(max_seconds=0.5, idle_seconds=60), body
    )
    assert proxy.limited == {"bytes": 0, "time": 1, "idle": 0}
    (rec,) = limit_records()
    assert rec["data"]["limit"] == "time" and rec["data"]["max"] == 0.5
    assert rec["data"]["seconds"] >= 0.5 and rec["data"]["bytes"] > 0


def test_idle_connection_is_closed_not_audited_as_a_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(p: E.EgressProxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        assert await r.read(-1) == b""  # then silence: closed

    # 2 s: the echo must not stall that long on a loaded host, or idle would fire before it
    proxy = run_proxy(tmp_path, monkeypatch, echo, Limits(idle_seconds=2.0), body)
    assert proxy.limited == {"bytes": 0, "time": 0, "idle": 1}
    assert limit_records() == []


def test_traffic_under_the_limits_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = bytes(range(256)) * 1024

    async def body(p: E.EgressProxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(payload)
        w.write_eof()
        assert await r.read(-1) == payload

    proxy = run_proxy(tmp_path, monkeypatch, echo, Limits(max_bytes=2 * len(payload)), body)
    assert proxy.limited == {"bytes": 0, "time": 0, "idle": 0}
    assert limit_records() == []


def test_defaults_are_generous_and_limits_must_be_positive() -> None:
    d = Limits()
    assert d.max_bytes == 1 << 30 and d.max_seconds == 3600.0 and d.idle_seconds == 300.0
    for bad in ({"max_bytes": 0}, {"max_seconds": 0}, {"idle_seconds": -1}):
        with pytest.raises(InvalidArgument):
            Limits(**bad)  # type: ignore[arg-type]


def test_limits_from_the_environment() -> None:
    assert Limits.from_env({}) == Limits()
    got = Limits.from_env({S.ENV_MAX_BYTES: "1048576", S.ENV_MAX_TIME: "10m", S.ENV_IDLE: "45"})
    assert got == Limits(max_bytes=1 << 20, max_seconds=600.0, idle_seconds=45.0)
    for env in ({S.ENV_MAX_BYTES: "0"}, {S.ENV_MAX_BYTES: "1G"}, {S.ENV_MAX_TIME: "-1"}):
        with pytest.raises(InvalidArgument):
            Limits.from_env(env)
