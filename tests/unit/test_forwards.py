"""Port forwards without a VM: the policy (pure), and the whole relay in-process.

The relay tests connect the real host pieces (``Forwards`` listeners, ``AgentClient``,
``TcpStream``) to the real guest agent code (``Agent`` serving one end of a Unix
socketpair in threads), with a local echo server standing in for the guest
application. The guest's "127.0.0.1" is the host's here; the VM version of the same
paths is tests/integration/test_ports.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.agent.guest import agent as A
from mvm.agent.guest import base
from mvm.api import models as M
from mvm.cli.ports import parse_mapping, port_specs
from mvm.daemon import forwards as F
from mvm.errors import AgentError, InvalidArgument, MvmError, PolicyDenied
from mvm.state import StateDB

T = TypeVar("T")
BOUND = 30.0  # seconds any scenario may take (they take well under one)


# ----------------------------------------------------------------------------- policy


@given(st.integers(0, 65535), st.integers(1, 65535))
def test_parse_mapping_round_trips(host_port: int, guest_port: int) -> None:
    assert parse_mapping(f"{host_port}:{guest_port}") == (host_port, guest_port)
    assert parse_mapping(str(guest_port)) == (0, guest_port)


@given(st.text(max_size=20))
def test_parse_mapping_rejects_or_returns_valid_ports(text: str) -> None:
    try:
        host_port, guest_port = parse_mapping(text)
    except InvalidArgument as exc:
        assert exc.hint
        return
    assert 0 <= host_port <= 65535 and 1 <= guest_port <= 65535


@pytest.mark.parametrize("bad", ["", ":", "8080:", "a:80", "1:2:3", "0", "80:0", "70000", "-1"])
def test_parse_mapping_bad_inputs(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_mapping(bad)


def test_port_specs_bind_loopback_by_default() -> None:
    (spec,) = port_specs(("8080:8000",))
    assert (spec.host, spec.host_port, spec.guest_port, spec.allow_wildcard) == (
        "127.0.0.1",
        8080,
        8000,
        False,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "*", "[::]", " 0.0.0.0 "])
def test_wildcard_needs_the_flag(host: str) -> None:
    with pytest.raises(PolicyDenied) as exc:
        F.check_spec(M.PortSpec(guest_port=80, host=host))
    assert exc.value.hint and "allow" in exc.value.hint
    ok = F.check_spec(M.PortSpec(guest_port=80, host=host, allow_wildcard=True))
    assert ok.host in ("0.0.0.0", "::")


@pytest.mark.parametrize(
    ("host", "want"), [("localhost", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("[::1]", "::1")]
)
def test_hosts_are_normalised(host: str, want: str) -> None:
    assert F.check_spec(M.PortSpec(guest_port=80, host=host)).host == want


@pytest.mark.parametrize(
    "spec",
    [
        M.PortSpec(guest_port=0),
        M.PortSpec(guest_port=65536),
        M.PortSpec(guest_port=80, host_port=-1),
        M.PortSpec(guest_port=80, host_port=65536),
        M.PortSpec(guest_port=80, host="example.org"),
    ],
)
def test_bad_specs_are_refused(spec: M.PortSpec) -> None:
    with pytest.raises(InvalidArgument):
        F.check_spec(spec)


# ----------------------------------------------------------------------------- in-process relay


class SockChannel(base.Channel):
    """The guest agent's channel on a socketpair end instead of a virtio-serial port."""

    def __init__(self, sock: socket.socket) -> None:
        self.path = "socketpair"
        self.fd = sock.fileno()
        self.lock = threading.Lock()


async def echo_server() -> tuple[asyncio.Server, int]:
    """The 'guest application': echoes until EOF, then closes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fetch(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    w.write_eof()
    out = await r.read()  # to EOF
    w.close()
    return out


_KEEP: list[socket.socket] = []
Body = Callable[[F.Forwards, AgentClient, int, A.Agent], Awaitable[T]]


def run_relay(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    body: Body[T],
    idle_timeout: float | None = F.IDLE_TIMEOUT,
) -> T:
    """A guest agent on a socketpair, a host AgentClient, Forwards on a temp StateDB and a
    local echo server; ``body(forwards, client, echo_port, agent)``, bounded."""
    monkeypatch.setenv("MVM_HOME", str(tmp_path / "home"))

    async def main() -> T:
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        agent = A.Agent(SockChannel(guest_sock))
        threading.Thread(target=agent.serve, daemon=True).start()
        reader, writer = await asyncio.open_unix_connection(sock=host_sock, limit=P.MAX_BODY + 64)
        client = AgentClient(reader, writer)
        server, echo_port = await echo_server()
        db = StateDB(tmp_path / "state.db")
        fwds = F.Forwards(db, lambda sid: client, idle_timeout=idle_timeout)
        try:
            async with asyncio.timeout(BOUND):
                return await body(fwds, client, echo_port, agent)
        finally:
            await fwds.close()
            server.close()
            deadline = time.monotonic() + BOUND
            while agent.tcp and time.monotonic() < deadline:  # let guest relays finish
                await asyncio.sleep(0.01)
            await client.close()
            guest_sock.shutdown(socket.SHUT_RDWR)  # the agent thread idles
            _KEEP.append(guest_sock)  # and its fd stays valid (never reused under it)
            db.close()

    return asyncio.run(main())


def test_relay_round_trips_bytes_and_persists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo))
        assert info.host == "127.0.0.1" and info.host_port > 0 and info.guest_port == echo
        assert info.audit_id  # port.forwarded was recorded
        got = await fetch(info.host_port, payload)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        (rec,) = fwds.db.forwards("sb-1")
        assert (rec.host_port, rec.guest_port, rec.wildcard) == (info.host_port, echo, False)
        # A restarted daemon binds the stored forward again, on the same port.
        await fwds.close()
        with pytest.raises(OSError):
            await fetch(info.host_port, b"x")
        again = F.Forwards(fwds.db, lambda sid: c)
        assert await again.restore("sb-1") == []
        assert [f.host_port for f in again.infos("sb-1")] == [info.host_port]
        assert await fetch(info.host_port, b"after restart") == b"after restart"
        await again.remove_all("sb-1")
        assert fwds.db.forwards("sb-1") == []
        with pytest.raises(OSError):
            await fetch(info.host_port, b"x")
        assert not ag.tcp  # every guest-side relay ended

    run_relay(tmp_path, monkeypatch, body)


def test_concurrent_connections_get_their_own_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo))
        blobs = [bytes([i]) * (100_000 + i) + os.urandom(64) for i in range(10)]
        got = await asyncio.gather(*(fetch(info.host_port, b) for b in blobs))
        assert got == blobs

    run_relay(tmp_path, monkeypatch, body)


def test_nobody_listening_closes_cleanly_and_forward_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        dead = free_port()
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=dead))
        assert await fetch(info.host_port, b"hello") == b""
        with pytest.raises(AgentError) as exc:
            await c.tcp_open(dead)
        assert exc.value.data["code"] == P.E_REFUSED
        ok = await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo))
        assert await fetch(ok.host_port, b"still fine") == b"still fine"
        assert await fetch(info.host_port, b"again") == b""
        assert c.failure is None

    run_relay(tmp_path, monkeypatch, body)


def test_port_in_use_and_non_local_hosts_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(InvalidArgument) as exc:
                await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo, host_port=port))
            assert str(port) in exc.value.message and exc.value.data["host_port"] == port
        with pytest.raises(InvalidArgument) as exc:
            await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo, host="192.0.2.1"))
        assert "not an address of this host" in exc.value.message
        with pytest.raises(PolicyDenied):
            await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo, host="0.0.0.0"))
        assert fwds.infos("sb-1") == [] and fwds.db.forwards("sb-1") == []

    run_relay(tmp_path, monkeypatch, body)


def test_connection_cap_per_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "MAX_CONNS_PER_FORWARD", 2)

    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo))
        held = []
        for _ in range(2):  # two open connections, proven live by an echo
            r, w = await asyncio.open_connection("127.0.0.1", info.host_port)
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            held.append(w)
        r, w = await asyncio.open_connection("127.0.0.1", info.host_port)
        assert await r.read() == b""  # the third is closed at once
        assert fwds.refused == 1
        w.close()
        for w in held:
            w.close()

    run_relay(tmp_path, monkeypatch, body)


def test_idle_connection_is_closed_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relayed connection that moves nothing for the idle timeout is closed, both sides:
    the host client sees EOF and the guest-side relay ends; the forward itself stays."""

    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo))
        r, w = await asyncio.open_connection("127.0.0.1", info.host_port)
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        assert await r.read() == b""  # then silence: mvmd closes it
        assert fwds.idle_closed == 1
        deadline = time.monotonic() + BOUND
        while ag.tcp and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not ag.tcp
        w.close()
        assert await fetch(info.host_port, b"next one") == b"next one"
        assert fwds.idle_closed == 1

    # 2 s: the echo above must not stall that long on a loaded host, or idle would fire early
    run_relay(tmp_path, monkeypatch, body, idle_timeout=2.0)


def test_half_open_idle_connection_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle timeout also ends a connection whose guest side is done but whose host
    client never closes (the half-open wait had no end before)."""

    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        server = await asyncio.start_server(_close_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=port))
        r, w = await asyncio.open_connection("127.0.0.1", info.host_port)
        assert await r.read() == b""  # guest EOF passed on; the client keeps its side open
        deadline = time.monotonic() + BOUND
        while fwds.idle_closed == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert fwds.idle_closed == 1
        w.close()
        server.close()

    run_relay(tmp_path, monkeypatch, body, idle_timeout=0.3)


async def _close_at_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.close()


def test_busy_connection_outlives_a_short_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = os.urandom(2 * 1024 * 1024)

    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        info = await fwds.add("sb-1", "web", M.PortSpec(guest_port=echo))
        assert await fetch(info.host_port, payload) == payload
        assert fwds.idle_closed == 0

    run_relay(tmp_path, monkeypatch, body, idle_timeout=5.0)


def test_idle_timeout_from_the_environment() -> None:
    assert F.idle_timeout_from_env({}) == F.IDLE_TIMEOUT == 600.0
    assert F.idle_timeout_from_env({F.IDLE_ENV: "90s"}) == 90.0
    assert F.idle_timeout_from_env({F.IDLE_ENV: "1h"}) == 3600.0
    assert F.idle_timeout_from_env({F.IDLE_ENV: "0"}) == 0.0
    for bad in ("-5", "soon", "nan"):
        with pytest.raises(InvalidArgument):
            F.idle_timeout_from_env({F.IDLE_ENV: bad})


def test_idle_timeout_must_not_be_negative(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    try:
        with pytest.raises(InvalidArgument):
            F.Forwards(db, lambda sid: None, idle_timeout=-1)  # type: ignore[arg-type,return-value]
        assert F.Forwards(db, lambda sid: None, idle_timeout=0).idle_timeout is None  # type: ignore[arg-type,return-value]
    finally:
        db.close()


def test_new_host_session_aborts_old_relays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(fwds: F.Forwards, c: AgentClient, echo: int, ag: A.Agent) -> None:
        stream = await c.tcp_open(echo)
        await stream.write(b"abc")
        assert await stream.read() == b"abc"
        assert len(ag.tcp) == 1
        await c.call(P.HELLO, {"nonce": "n", "session": "first"})  # no time/seed: no side effects
        await c.call(P.HELLO, {"nonce": "n", "session": "second"})
        assert await stream.read() == b""  # the relay ended
        assert stream.finished and not ag.tcp

    run_relay(tmp_path, monkeypatch, body)


# ----------------------------------------------------------------------------- guest window


class FakeChannel:
    def __init__(self) -> None:
        self.frames: list[P.Frame] = []
        self.cond = threading.Condition()
        self.fd = -1

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        (frame,) = P.FrameDecoder().feed(P.encode(header, payload))
        with self.cond:
            self.frames.append(frame)
            self.cond.notify_all()

    def out_bytes(self, rid: int) -> int:
        with self.cond:
            return sum(len(f.payload) for f in self.frames if f.id == rid and f.type == P.OUT)

    def wait_bytes(self, rid: int, n: int) -> None:
        deadline = time.monotonic() + BOUND
        with self.cond:
            while self.out_bytes(rid) < n:
                assert time.monotonic() < deadline, f"guest sent {self.out_bytes(rid)} < {n}"
                self.cond.wait(0.5)


def test_guest_never_exceeds_the_window() -> None:
    """A guest application that talks faster than the host reads is held to TCP_WINDOW."""
    big = os.urandom(4 * P.TCP_WINDOW)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def app() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(big)

    threading.Thread(target=app, daemon=True).start()
    ch = FakeChannel()
    agent = A.Agent(ch)  # type: ignore[arg-type]
    rid = 7
    agent.dispatch(P.Frame({"t": P.TCP_OPEN, "id": rid, "port": port}))
    ch.wait_bytes(rid, P.TCP_WINDOW)
    # Once the window is full the guest stops until acked; the app is still not done.
    assert ch.out_bytes(rid) == P.TCP_WINDOW
    assert all(len(f.payload) <= P.TCP_CHUNK for f in ch.frames)
    agent.dispatch(P.Frame({"t": P.TCP_ACK, "id": 0, "ref": rid, "bytes": P.TCP_CHUNK}))
    ch.wait_bytes(rid, P.TCP_WINDOW + P.TCP_CHUNK)
    assert ch.out_bytes(rid) == P.TCP_WINDOW + P.TCP_CHUNK
    agent.dispatch(P.Frame({"t": P.TCP_CLOSE, "id": 0, "ref": rid}))
    deadline = time.monotonic() + BOUND
    while not [f for f in ch.frames if f.id == rid and f.type == P.OK]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not agent.tcp
    srv.close()


def test_guest_rejects_bad_tcp_requests() -> None:
    ch = FakeChannel()
    agent = A.Agent(ch)  # type: ignore[arg-type]
    for rid, header in enumerate(
        [
            {"t": P.TCP_OPEN, "port": 0},
            {"t": P.TCP_OPEN, "port": 70000},
            {"t": P.TCP_OPEN, "port": "80"},
            {"t": P.TCP_DATA, "ref": 999},
        ],
        start=1,
    ):
        agent.handle(P.Frame({**header, "id": rid}))
        (err,) = [f for f in ch.frames if f.id == rid]
        assert err.type == P.ERR
    assert not agent.tcp


def test_host_stream_rejects_oversized_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile guest that ignores TCP_CHUNK breaks the protocol: a clear error, no crash."""

    async def main() -> None:
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=host_sock, limit=P.MAX_BODY + 64)
        greader, gwriter = await asyncio.open_unix_connection(sock=guest_sock)
        client = AgentClient(reader, writer)
        dec = P.FrameDecoder()

        async def guest() -> None:
            (req,) = dec.feed(await greader.read(65536))
            gwriter.write(P.encode({"t": P.STARTED, "id": req.id}))
            gwriter.write(
                P.encode({"t": P.OUT, "id": req.id, "stream": "tcp"}, b"x" * (P.TCP_CHUNK + 1))
            )
            await gwriter.drain()

        async with asyncio.timeout(BOUND):
            g = asyncio.create_task(guest())
            stream = await client.tcp_open(80)
            with pytest.raises(MvmError, match="larger than"):
                await stream.read()
            await g
        gwriter.close()
        await client.close()

    asyncio.run(main())
