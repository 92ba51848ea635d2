"""The egress proxy: a sandbox's only way out, one listener per sandbox in mvmd.

The guest's NIC is user-mode networking with ``restrict=on``; its single way out is a
guestfwd to 10.0.2.100:3128, which QEMU serves by running ``egress_relay`` per
connection into this proxy's Unix socket (``<run dir>/egress.sock``). Because the
socket belongs to one sandbox, the proxy knows whose policy applies without trusting
anything the guest says about itself.

Per connection: read one bounded request head (``CONNECT host:port`` or an
absolute-form ``http://`` request), decide by name and port (``policy.network.decide``),
resolve the name once, refuse if any resolved address is never reachable (loopback,
link-local/metadata, the slirp net, the host's own addresses...), connect to the
checked address itself (never re-resolving: no DNS rebinding), then copy bytes both
ways. Every decision is written to the audit log.

Bounds: head size, concurrent connections and new connections per second per
sandbox, resolution/connect timeouts, addresses per name; and per relayed connection
(``Limits``) an idle timeout, a byte cap (both directions together) and a total-time
cap. Hitting the byte or time cap ends the connection, is logged and is audited as
``egress.limit`` naming the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from mvm import paths
from mvm.daemon.egress_splice import Limits, SpliceEnd, audit_limit, splice
from mvm.errors import InvalidArgument
from mvm.policy import network as N
from mvm.vmm.argv import EGRESS_ADDR, EGRESS_PORT

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 15.0
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
#: New connections per second a sandbox may open (a burst of ``RATE_BURST``).
RATE_PER_SECOND = 20.0
RATE_BURST = 100.0
MAX_ADDRESSES = 16
CHUNK = 64 * 1024
#: Hop-by-hop headers dropped from a forwarded plain-HTTP request.
_HOP_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"upgrade"}
)

#: Called with every decision (for the sandbox's log); must not raise.
DecisionHook = Callable[["Verdict"], None]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ProxyRequest:
    method: str
    target: N.Target
    #: The head to send upstream (origin-form, hop-by-hop headers dropped); None for CONNECT.
    upstream_head: bytes | None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    host: str
    port: int
    rule: str
    reason: str = ""
    address: str | None = None


def parse_head(head: bytes) -> ProxyRequest:
    """Parse a proxy request head (ending in CRLF CRLF). Pure; raises BadRequest."""
    if len(head) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, uri, version = parts
    if not method.isalpha() or not method.isupper():
        raise BadRequest(400, "malformed method")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isascii():
            raise BadRequest(400, "malformed header line")
        headers.append((name, value.strip()))
    try:
        if method == "CONNECT":
            return ProxyRequest(method, N.parse_target(uri), None)
        if not uri.lower().startswith("http://"):
            raise BadRequest(
                400, "only CONNECT (for https) and absolute http:// URLs go through the proxy"
            )
        rest = uri[len("http://") :]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:] or "/"
        if path.startswith("?"):
            path = "/" + path
        if "@" in authority:
            raise BadRequest(400, "credentials in the URL are not supported")
        target = N.parse_target(authority, 80)
    except InvalidArgument as exc:
        raise BadRequest(400, exc.message) from None
    out = [f"{method} {path} {version}"]
    has_host = False
    for name, value in headers:
        low = name.lower().encode()
        if low in _HOP_HEADERS:
            continue
        has_host = has_host or low == b"host"
        out.append(f"{name}: {value}")
    if not has_host:
        out.append(f"Host: {authority}")
    out.append("Connection: close")
    return ProxyRequest(method, target, ("\r\n".join(out) + "\r\n\r\n").encode("ascii"))


def response(status: int, reason: str, body: str) -> bytes:
    data = body.encode("utf-8", "replace")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"X-Mvm-Egress: {'denied' if status == 403 else 'error'}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + data


class Resolver:
    """Name → addresses: ``MVM_EGRESS_RESOLVE`` entries first, else the host's resolver."""

    def __init__(self, override: dict[str, list[N.IPAddress]] | None = None) -> None:
        self.override = override or {}

    @classmethod
    def from_env(cls) -> Resolver:
        return cls(N.parse_resolve_override(os.environ.get("MVM_EGRESS_RESOLVE", "")))

    async def resolve(self, host: str, port: int) -> list[N.IPAddress]:
        if host in self.override:
            return self.override[host][:MAX_ADDRESSES]
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
        )
        out: list[N.IPAddress] = []
        for info in infos:
            addr = N.parse_ip(str(info[4][0]).split("%")[0])
            if addr is not None and addr not in out:
                out.append(addr)
        return out[:MAX_ADDRESSES]


class HostAddresses:
    """The host's own addresses, re-read at most every few seconds."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._at = -1e9
        self._addrs: set[N.IPAddress] = set()

    def get(self) -> set[N.IPAddress]:
        now = time.monotonic()
        if now - self._at > self.ttl:
            self._addrs = N.host_addresses()
            self._at = now
        return self._addrs


_HOST_ADDRESSES = HostAddresses()


def audit_decision(sandbox: str, v: Verdict) -> str | None:
    """Write one egress decision to the audit log; log (never raise) if that fails."""
    try:
        from mvm import audit

        return audit.record(
            "egress.allowed" if v.allowed else "egress.denied",
            sandbox=sandbox,
            host=v.host,
            port=v.port,
            rule=v.rule,
            reason=v.reason,
            address=v.address,
        )
    except Exception as exc:  # the audit log failing must not take the proxy down
        log.warning("egress decision for %s not audited: %s", sandbox, exc)
        return None


PROXY_URL = f"http://{EGRESS_ADDR}:{EGRESS_PORT}"


def proxy_env() -> dict[str, str]:
    """What every command of a sandbox with a network gets in its environment."""
    return {
        "http_proxy": PROXY_URL,
        "https_proxy": PROXY_URL,
        "HTTP_PROXY": PROXY_URL,
        "HTTPS_PROXY": PROXY_URL,
        "no_proxy": "localhost,127.0.0.1",
        "NO_PROXY": "localhost,127.0.0.1",
    }


async def policy_for(preset: str, allow: list[str]) -> N.Policy:
    """A sandbox's policy: the preset as this host expands it, plus its allow entries.
    Raises InvalidArgument for an unknown preset or a bad pattern."""
    N.make_policy(preset, allow)  # refuse bad input before reading host configuration
    extra = await asyncio.to_thread(N.preset_patterns, preset, paths.home())
    return N.make_policy(preset, allow, extra)


class EgressProxy:
    """The egress listener of one sandbox."""

    def __init__(
        self,
        sandbox: str,
        policy: N.Policy,
        socket_path: Path,
        *,
        resolver: Resolver | None = None,
        on_decision: DecisionHook | None = None,
        max_connections: int = MAX_CONNECTIONS,
        limits: Limits | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.policy = policy
        self.socket_path = socket_path
        self.resolver = resolver or Resolver.from_env()
        self.on_decision = on_decision
        self.max_connections = max_connections
        self.active = 0
        self.limits = limits or Limits.from_env()
        self.refused_busy = 0
        #: Connections ended by a cap, by limit ("bytes", "time", "idle").
        self.limited: dict[str, int] = {"bytes": 0, "time": 0, "idle": 0}
        self._tokens = RATE_BURST
        self._tokens_at = time.monotonic()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on the socket path (replacing a stale socket from a previous mvmd)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(self.socket_path), limit=MAX_HEAD
        )
        os.chmod(self.socket_path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

    def _rate_ok(self) -> bool:
        now = time.monotonic()
        self._tokens = min(RATE_BURST, self._tokens + (now - self._tokens_at) * RATE_PER_SECOND)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self.active >= self.max_connections or not self._rate_ok():
                self.refused_busy += 1
                with contextlib.suppress(OSError):
                    writer.write(response(503, "Busy", "mvm egress proxy: too many connections\n"))
                    await asyncio.wait_for(writer.drain(), 2.0)
                return
            self.active += 1
            try:
                await self._serve(reader, writer)
            finally:
                self.active -= 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a guest must never take the proxy down
            log.exception("egress proxy of %s: unexpected error", self.sandbox)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _decided(self, v: Verdict) -> None:
        audit_decision(self.sandbox, v)
        if self.on_decision is not None:
            with contextlib.suppress(Exception):
                self.on_decision(v)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            await _reply(writer, 431, "Request Header Fields Too Large", "request head too large")
            return
        except asyncio.IncompleteReadError:
            return
        try:
            req = parse_head(head)
        except BadRequest as exc:
            await _reply(writer, exc.status, "Bad Request", str(exc))
            return
        t = req.target
        d = N.decide(self.policy, t)
        if not d.allowed:
            self._decided(Verdict(False, t.host, t.port, d.rule, d.reason))
            await _deny(writer, t, d.rule, d.reason)
            return
        try:
            addrs = [t.ip] if t.ip is not None else await self.resolver.resolve(t.host, t.port)
        except (TimeoutError, OSError) as exc:
            reason = f"cannot resolve {t.host}: {str(exc) or 'timed out'}"
            self._decided(Verdict(False, t.host, t.port, "resolve", reason))
            await _reply(writer, 502, "Bad Gateway", reason)
            return
        if not addrs:
            self._decided(Verdict(False, t.host, t.port, "resolve", "no addresses"))
            await _reply(writer, 502, "Bad Gateway", f"{t.host} has no addresses")
            return
        own = _HOST_ADDRESSES.get()
        for addr in addrs:
            why = N.address_refusal(addr, own)
            if why is not None:
                reason = f"{t.host} resolves to {addr}: {why} is never reachable"
                self._decided(Verdict(False, t.host, t.port, "always-refused", reason, str(addr)))
                await _deny(writer, t, "always-refused", reason)
                return
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        errors = []
        chosen: N.IPAddress | None = None
        for addr in addrs:
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(str(addr), t.port, limit=CHUNK), CONNECT_TIMEOUT
                )
                chosen = addr
                break
            except (TimeoutError, OSError) as exc:
                errors.append(f"{addr}: {str(exc) or 'timed out'}")
        if upstream is None:
            reason = f"cannot connect to {t.host}:{t.port} ({'; '.join(errors)})"
            self._decided(Verdict(False, t.host, t.port, d.rule, reason))
            await _reply(writer, 502, "Bad Gateway", reason)
            return
        self._decided(Verdict(True, t.host, t.port, d.rule, "", str(chosen)))
        up_r, up_w = upstream
        try:
            if req.upstream_head is None:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            else:
                up_w.write(req.upstream_head)
                await up_w.drain()
            end = await splice(reader, writer, up_r, up_w, self.limits)
        finally:
            up_w.close()
        if end.limit is not None:
            self._limit_hit(t, end)

    def _limit_hit(self, t: N.Target, end: SpliceEnd) -> None:
        """Count, log and (for the byte and time caps) audit a connection cut by a limit."""
        limit = end.limit or "?"
        self.limited[limit] = self.limited.get(limit, 0) + 1
        if limit == "idle":
            log.info("egress %s -> %s:%d: idle, closed", self.sandbox, t.host, t.port)
            return
        cap = self.limits.max_bytes if limit == "bytes" else self.limits.max_seconds
        log.warning(
            "egress %s -> %s:%d: %s limit (%s) reached after %d bytes, %.1fs; closed",
            self.sandbox,
            t.host,
            t.port,
            end.limit,
            cap,
            end.bytes,
            end.seconds,
        )
        audit_limit(self.sandbox, t, end, cap)


async def _reply(writer: asyncio.StreamWriter, status: int, reason: str, message: str) -> None:
    writer.write(response(status, reason, f"mvm egress proxy: {message}\n"))
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.drain(), 5.0)


async def _deny(writer: asyncio.StreamWriter, t: N.Target, rule: str, reason: str) -> None:
    await _reply(
        writer,
        403,
        "Forbidden by mvm egress policy",
        f"{t.host}:{t.port} refused by rule {rule}: {reason}",
    )


__all__ = [
    "PROXY_URL",
    "EgressProxy",
    "Limits",
    "ProxyRequest",
    "Resolver",
    "Verdict",
    "audit_decision",
    "parse_head",
    "policy_for",
    "proxy_env",
]


@contextlib.asynccontextmanager
async def serve_egress(vm_id: str, policy: N.Policy) -> AsyncIterator[None]:
    """For a VM booted outside the sandbox service (the image builder): its egress proxy,
    served by this process for the VM's life, at the socket its QEMU command line names."""
    if not policy.enabled:
        yield
        return
    proxy = EgressProxy(vm_id, policy, paths.run_dir() / vm_id / "egress.sock")
    await proxy.start()
    try:
        yield
    finally:
        await proxy.close()
