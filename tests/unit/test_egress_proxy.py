"""mvmd's egress proxy itself, over loopback, with no VM and no network namespace.

tests/security/test_network.py proves the whole path from a real guest; these tests prove
the proxy's decisions on any host, so they run (and fail) even where a namespace cannot
be made. The proxy listens on its Unix socket as in mvmd; the "guest" is a test client on
that socket; names are answered by a fixed resolver (the proxy's own ``resolver=`` seam).

The one upstream the allowed-path tests reach is a server on 127.0.0.2. Loopback is
always refused, so those tests let exactly that address through ``address_refusal``;
every other address (127.0.0.1, 169.254.169.254, ...) still meets the real check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from mvm.audit import log as audit_log
from mvm.daemon import egress, egress_splice
from mvm.policy import network as N

UPSTREAM = "127.0.0.2"
WAIT = 20.0  # bound for every read: a hang fails the test, it never measures speed


class FixedResolver(egress.Resolver):
    """Answers from a table; a name with several answers gets the next one per call."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[N.IPAddress]:
        n = sum(1 for c in self.calls if c == host)
        self.calls.append(host)
        table = self.answers[host]
        return [ipaddress.ip_address(a) for a in table[min(n, len(table) - 1)]]


@pytest.fixture
def sock_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short directory for the proxy's socket; MVM_HOME (the audit log) inside it."""
    d = Path(tempfile.mkdtemp(prefix="mvm-eg-", dir="/tmp"))
    monkeypatch.setenv("MVM_HOME", str(d / "home"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def upstream_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test upstream (127.0.0.2, and only it) pass the always-refused check."""
    real = N.address_refusal
    allowed = ipaddress.ip_address(UPSTREAM)

    def refusal(addr: N.IPAddress, host_addresses: object = ()) -> str | None:
        return None if addr == allowed else real(addr, host_addresses)  # type: ignore[arg-type]

    monkeypatch.setattr(egress.N, "address_refusal", refusal)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


class Harness:
    """One proxy (and optionally one upstream) inside one event loop."""

    def __init__(self, sock_dir: Path, allow: list[str], preset: str = "none") -> None:
        self.sock_dir = sock_dir
        self.allow = allow
        self.preset = preset
        self.verdicts: list[egress.Verdict] = []
        self.port = 0

    async def run(
        self,
        answers: dict[str, list[list[str]]],
        body: Callable[[Harness], Awaitable[None]],
        upstream: Handler = echo,
    ) -> FixedResolver:
        server = await asyncio.start_server(upstream, UPSTREAM, 0)
        self.port = server.sockets[0].getsockname()[1]
        allow = [a.replace("PORT", str(self.port)) for a in self.allow]
        resolver = FixedResolver(answers)
        proxy = egress.EgressProxy(
            "sb-test",
            N.make_policy(self.preset, allow),
            self.sock_dir / "egress.sock",
            resolver=resolver,
            on_decision=self.verdicts.append,
        )
        await proxy.start()
        try:
            await body(self)
        finally:
            await proxy.close()
            server.close()
            await server.wait_closed()
        return resolver

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.sock_dir / "egress.sock"))

    async def ask(self, head: bytes) -> bytes:
        """Send a head, return everything the proxy answers until it closes."""
        r, w = await self.connect()
        w.write(head)
        await w.drain()
        try:
            return await asyncio.wait_for(r.read(), WAIT)
        finally:
            w.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split(b" ")[1])


def audit_events() -> list[str]:
    path = audit_log.default_path()
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


def test_allowed_name_connects_to_the_resolved_address_and_copies_bytes(
    sock_dir: Path, upstream_allowed: None
) -> None:
    h = Harness(sock_dir, ["example.test:PORT"])

    async def body(h: Harness) -> None:
        r, w = await h.connect()
        w.write(f"CONNECT example.test:{h.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await w.drain()
        line = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)
        assert line == b"HTTP/1.1 200 Connection established\r\n\r\n"
        w.write(b"ping-through-the-proxy")
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(b"ping-through-the-proxy")), WAIT)
        assert got == b"ping-through-the-proxy"
        w.close()

    resolver = asyncio.run(h.run({"example.test": [[UPSTREAM]]}, body))
    assert resolver.calls == ["example.test"]
    [v] = h.verdicts
    assert (v.allowed, v.host, v.port, v.rule, v.address) == (
        True,
        "example.test",
        h.port,
        f"example.test:{h.port}",
        UPSTREAM,
    )
    [event] = audit_events()
    assert '"egress.allowed"' in event and '"example.test"' in event


def test_plain_http_is_forwarded_in_origin_form_without_proxy_headers(
    sock_dir: Path, upstream_allowed: None
) -> None:
    seen: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nfrom-origin")
        await writer.drain()
        writer.close()

    h = Harness(sock_dir, ["example.test:PORT"])
    answers: list[bytes] = []

    async def body(h: Harness) -> None:
        answers.append(
            await h.ask(
                f"GET http://example.test:{h.port}/a?b=1 HTTP/1.1\r\n"
                "Proxy-Authorization: Basic c2VjcmV0\r\nAccept: */*\r\n\r\n".encode()
            )
        )

    asyncio.run(h.run({"example.test": [[UPSTREAM]]}, body, upstream=origin))
    assert answers == [b"HTTP/1.0 200 OK\r\n\r\nfrom-origin"]
    [head] = seen
    assert head.startswith(b"GET /a?b=1 HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in head
    assert b"Connection: close\r\n" in head
    assert f"Host: example.test:{h.port}\r\n".encode() in head


def test_name_outside_the_allowlist_is_refused_before_resolving(sock_dir: Path) -> None:
    h = Harness(sock_dir, ["example.test"])
    answers: list[bytes] = []

    async def body(h: Harness) -> None:
        answers.append(await h.ask(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n"))

    resolver = asyncio.run(h.run({}, body))
    [answer] = answers
    assert status_of(answer) == 403
    assert b"X-Mvm-Egress: denied\r\n" in answer
    assert resolver.calls == []
    [v] = h.verdicts
    assert (v.allowed, v.host, v.port, v.rule) == (False, "other.test", 443, "not-allowed")
    [event] = audit_events()
    assert '"egress.denied"' in event and '"not-allowed"' in event


def test_raw_ip_is_refused_even_when_unrestricted(sock_dir: Path) -> None:
    h = Harness(sock_dir, [], preset="unrestricted")
    answers: list[bytes] = []

    async def body(h: Harness) -> None:
        answers.append(await h.ask(b"CONNECT 203.0.113.7:443 HTTP/1.1\r\n\r\n"))

    resolver = asyncio.run(h.run({}, body))
    assert status_of(answers[0]) == 403
    assert resolver.calls == []
    [v] = h.verdicts
    assert (v.allowed, v.host, v.rule) == (False, "203.0.113.7", "raw-ip")


@pytest.mark.parametrize(
    "head",
    [
        # the metadata address named literally, even when the allowlist names it
        b"CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
        # an allowed name that resolves to the metadata address
        b"GET http://metadata.test/latest/meta-data/ HTTP/1.1\r\n\r\n",
    ],
)
def test_metadata_address_is_never_reachable(sock_dir: Path, head: bytes) -> None:
    h = Harness(sock_dir, ["169.254.169.254:80", "metadata.test"])
    answers: list[bytes] = []

    async def body(h: Harness) -> None:
        answers.append(await h.ask(head))

    asyncio.run(h.run({"metadata.test": [["169.254.169.254"]]}, body))
    assert status_of(answers[0]) == 403
    [v] = h.verdicts
    assert (v.allowed, v.rule, v.address) == (False, "always-refused", "169.254.169.254")
    assert "link-local or metadata" in v.reason


def test_rebinding_answer_with_any_refused_address_is_refused(sock_dir: Path) -> None:
    """A name answering a public address and loopback is refused as a whole."""
    h = Harness(sock_dir, ["rebind.test"])
    answers: list[bytes] = []

    async def body(h: Harness) -> None:
        answers.append(await h.ask(b"CONNECT rebind.test:443 HTTP/1.1\r\n\r\n"))

    asyncio.run(h.run({"rebind.test": [["203.0.113.9", "127.0.0.1"]]}, body))
    assert status_of(answers[0]) == 403
    [v] = h.verdicts
    assert (v.allowed, v.rule, v.address) == (False, "always-refused", "127.0.0.1")


def test_name_is_resolved_once_and_the_checked_address_is_the_one_connected(
    sock_dir: Path, upstream_allowed: None
) -> None:
    """A name whose second answer would be loopback: the proxy never asks twice, so the
    connection goes to the address it checked."""
    h = Harness(sock_dir, ["rebind.test:PORT"])

    async def body(h: Harness) -> None:
        r, w = await h.connect()
        w.write(f"CONNECT rebind.test:{h.port} HTTP/1.1\r\n\r\n".encode())
        await w.drain()
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT) == (
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        w.close()

    resolver = asyncio.run(h.run({"rebind.test": [[UPSTREAM], ["127.0.0.1"]]}, body))
    assert resolver.calls == ["rebind.test"]
    [v] = h.verdicts
    assert (v.allowed, v.address) == (True, UPSTREAM)


def test_oversized_request_head_is_refused_with_431(sock_dir: Path) -> None:
    h = Harness(sock_dir, ["example.test"])
    answers: list[bytes] = []

    async def body(h: Harness) -> None:
        head = b"GET http://example.test/ HTTP/1.1\r\nX-Pad: " + b"a" * (egress.MAX_HEAD + 1024)
        answers.append(await h.ask(head))

    resolver = asyncio.run(h.run({}, body))
    assert status_of(answers[0]) == 431
    assert resolver.calls == [] and h.verdicts == []


def test_idle_connection_is_closed_after_the_idle_timeout(
    sock_dir: Path, upstream_allowed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing moves either way: the proxy ends the tunnel (the guest reads EOF and the
    upstream sees its side closed) instead of holding it open forever."""
    monkeypatch.setattr(egress_splice, "IDLE_TIMEOUT", 0.5)
    upstream_closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # returns only when the proxy closes its side
        upstream_closed.set()
        writer.close()

    h = Harness(sock_dir, ["idle.test:PORT"])
    rest: list[bytes] = []

    async def body(h: Harness) -> None:
        r, w = await h.connect()
        w.write(f"CONNECT idle.test:{h.port} HTTP/1.1\r\n\r\n".encode())
        await w.drain()
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)
        rest.append(await asyncio.wait_for(r.read(), WAIT))  # EOF, or TimeoutError fails
        await asyncio.wait_for(upstream_closed.wait(), WAIT)
        w.close()

    asyncio.run(h.run({"idle.test": [[UPSTREAM]]}, body, upstream=silent))
    assert rest == [b""]
    assert upstream_closed.is_set()
