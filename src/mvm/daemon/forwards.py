"""Port forwards: host TCP listeners whose connections the guest agent relays.

No NIC is involved: mvmd listens on ``host:host_port``; each accepted connection
becomes a ``tcp.open`` relay over the agent channel to ``127.0.0.1:guest_port`` in the
guest. So a sandbox without any network device can still serve a port, and the
guest cannot reach the host through it (it only ever answers connections the host
accepted). Policy (``check_spec``) is pure; listeners and relays are the side effects.

Bounds: at most ``MAX_CONNS_PER_FORWARD`` relayed connections per forward and
``MAX_CONNS_PER_SANDBOX`` per sandbox (extra connections are closed at once), at most
``MAX_FORWARDS`` forwards per sandbox; a connection that moves no byte either way for
``idle_timeout`` seconds (``IDLE_TIMEOUT``, or ``MVM_FORWARD_IDLE_TIMEOUT``) is closed
and counted (``idle_closed``). Guest->host bytes are windowed by the protocol
(``TCP_WINDOW``), so a guest cannot make mvmd buffer more than that per connection.
Forwards are stored in SQLite with their sandbox and bound again by a restarted mvmd;
``down`` (or failure) closes and forgets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient, TcpStream
from mvm.api import models as M
from mvm.durations import parse_duration
from mvm.errors import ForwardNotFound, HostError, InvalidArgument, MvmError, PolicyDenied
from mvm.state import ForwardRecord, StateDB

log = logging.getLogger(__name__)

MAX_CONNS_PER_FORWARD = 64
MAX_CONNS_PER_SANDBOX = 96
MAX_FORWARDS = 32
#: Seconds to wait for the guest to connect to its port.
OPEN_TIMEOUT = 10.0
#: Seconds a relayed connection may move no byte either way before it is closed (the
#: default of ``Forwards(idle_timeout=...)``, overridden by ``MVM_FORWARD_IDLE_TIMEOUT``).
IDLE_TIMEOUT = 600.0
IDLE_ENV = "MVM_FORWARD_IDLE_TIMEOUT"
#: Host strings that mean "every address".
WILDCARDS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})

AgentFor = Callable[[str], AgentClient]


# ----------------------------------------------------------------------------- policy (pure)


def is_wildcard(host: str) -> bool:
    return host.strip() in WILDCARDS


def normalize_host(host: str) -> str:
    """The address to bind: an IP literal ("localhost" is 127.0.0.1; "*"/"" are 0.0.0.0)."""
    h = host.strip()
    if h in ("", "*"):
        return "0.0.0.0"
    if h.lower() == "localhost":
        return "127.0.0.1"
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        raise InvalidArgument(
            f"forward host {host!r} is not an IP address",
            hint="give an address of this host, e.g. 127.0.0.1 (the default)",
            host=host,
        ) from None


def check_spec(spec: M.PortSpec) -> M.PortSpec:
    """Validate a forward request; return it with the host normalised. Pure."""
    if not 1 <= spec.guest_port <= 65535:
        raise InvalidArgument(
            f"guest port {spec.guest_port} is not in 1-65535", guest_port=spec.guest_port
        )
    if not 0 <= spec.host_port <= 65535:
        raise InvalidArgument(
            f"host port {spec.host_port} is not in 0-65535 (0: any free port)",
            host_port=spec.host_port,
        )
    host = normalize_host(spec.host)
    if ipaddress.ip_address(host).is_unspecified and not spec.allow_wildcard:
        raise PolicyDenied(
            f"refusing to bind the wildcard address {host!r}: the port would be reachable "
            "from other machines",
            hint="bind 127.0.0.1 (the default), or pass --allow-wildcard / allow_wildcard=True",
            host=host,
        )
    return M.PortSpec(
        guest_port=spec.guest_port,
        host_port=spec.host_port,
        host=host,
        allow_wildcard=spec.allow_wildcard,
    )


def idle_timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """``MVM_FORWARD_IDLE_TIMEOUT`` (seconds or 10m, 1h...; 0 turns it off), else the default."""
    raw = (os.environ if environ is None else environ).get(IDLE_ENV, "").strip()
    if not raw:
        return IDLE_TIMEOUT
    if raw in ("0", "0s", "off"):
        return 0.0
    return parse_duration(raw, IDLE_ENV)


def forward_info(rec: ForwardRecord) -> M.ForwardInfo:
    return M.ForwardInfo(
        id=rec.id,
        host=rec.host,
        host_port=rec.host_port,
        guest_port=rec.guest_port,
        audit_id=rec.audit_id,
    )


def _audit(event: str, rec: ForwardRecord, reason: str | None = None) -> str | None:
    try:
        from mvm import audit

        return audit.record(
            event,
            sandbox=rec.sandbox,
            forward=rec.id,
            host=rec.host,
            host_port=rec.host_port,
            guest_port=rec.guest_port,
            wildcard=rec.wildcard,
            **({"reason": reason} if reason else {}),
        )
    except Exception as exc:  # the audit log is someone else's; never crash a relay on it
        log.warning("audit of %s failed: %s", event, exc)
        return None


# ----------------------------------------------------------------------------- relay


async def relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: TcpStream,
    idle_timeout: float | None = None,
) -> bool:
    """Copy bytes both ways until both sides are done; half-closes are passed on.

    With ``idle_timeout``, a connection that moves no byte either way for that many
    seconds is ended; returns True when that is why it ended."""
    last = time.monotonic()

    async def up() -> None:  # host client -> guest
        nonlocal last
        while True:
            data = await reader.read(P.CHUNK)
            last = time.monotonic()
            if not data:
                await stream.write_eof()
                return
            await stream.write(data)

    async def down() -> None:  # guest -> host client
        nonlocal last
        while True:
            data = await stream.read()
            last = time.monotonic()
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def both() -> None:
        await asyncio.wait({t_down}, return_when=asyncio.FIRST_EXCEPTION)
        if t_down.exception() is None and not stream.finished:
            await asyncio.wait({t_up}, return_when=asyncio.FIRST_EXCEPTION)  # half-open

    async def idle(limit: float) -> None:  # returns once nothing moved for ``limit`` s
        while (left := last + limit - time.monotonic()) > 0:
            await asyncio.sleep(left)

    t_up = asyncio.create_task(up())
    t_down = asyncio.create_task(down())
    t_both = asyncio.create_task(both())
    watch = [asyncio.create_task(idle(idle_timeout))] if idle_timeout else []
    try:
        done, _ = await asyncio.wait({t_both, *watch}, return_when=asyncio.FIRST_COMPLETED)
        return t_both not in done
    finally:
        for t in (t_up, t_down, t_both, *watch):
            t.cancel()
        await asyncio.gather(t_up, t_down, t_both, *watch, return_exceptions=True)


# ----------------------------------------------------------------------------- listeners


@dataclass
class Forward:
    rec: ForwardRecord
    server: asyncio.Server
    conns: set[asyncio.Task[None]] = field(default_factory=set)


class Forwards:
    """Every forward mvmd serves, by sandbox id."""

    def __init__(
        self, db: StateDB, agent_for: AgentFor, *, idle_timeout: float | None = None
    ) -> None:
        """``idle_timeout``: seconds (0 turns it off); None: ``idle_timeout_from_env()``."""
        if idle_timeout is None:
            idle_timeout = idle_timeout_from_env()
        if not idle_timeout >= 0:
            raise InvalidArgument(f"forward idle timeout must be >= 0, not {idle_timeout!r}")
        self.db = db
        self.agent_for = agent_for
        #: None when turned off.
        self.idle_timeout: float | None = idle_timeout or None
        self._by_sandbox: dict[str, dict[str, Forward]] = {}
        self._active: dict[str, int] = {}
        self.refused = 0  # connections closed at once because a cap was reached
        self.idle_closed = 0  # connections closed because nothing moved for idle_timeout

    def infos(self, sandbox_id: str) -> list[M.ForwardInfo]:
        return [forward_info(f.rec) for f in self._by_sandbox.get(sandbox_id, {}).values()]

    async def add(self, sandbox_id: str, sandbox: str, spec: M.PortSpec) -> M.ForwardInfo:
        """Check, bind, audit and store a forward. The bind is the host-side check: a port
        in use or an address that is not this host's is refused with a clear error."""
        spec = check_spec(spec)
        mine = self._by_sandbox.setdefault(sandbox_id, {})
        if len(mine) >= MAX_FORWARDS:
            raise InvalidArgument(f"{sandbox} already has {MAX_FORWARDS} forwards")
        rec = ForwardRecord(
            id="fw-" + secrets.token_hex(4),
            sandbox_id=sandbox_id,
            sandbox=sandbox,
            host=spec.host,
            host_port=spec.host_port,
            guest_port=spec.guest_port,
            wildcard=ipaddress.ip_address(spec.host).is_unspecified,
            created=time.time(),
        )
        fwd = await self._bind(rec)
        rec.host_port = fwd.server.sockets[0].getsockname()[1]
        rec.audit_id = _audit("port.forwarded", rec)
        if rec.wildcard and rec.audit_id is None:
            await self._unbind(fwd)
            raise HostError(
                "refusing a wildcard forward that could not be audited",
                hint="check the audit log (mvmctl audit verify)",
            )
        try:
            self.db.add_forward(rec)
        except BaseException:
            await self._unbind(fwd)
            raise
        mine[rec.id] = fwd
        log.info(
            "forward %s: %s:%d -> %s:%d", rec.id, rec.host, rec.host_port, sandbox, rec.guest_port
        )
        return forward_info(rec)

    async def remove(self, sandbox_id: str, forward_id: str) -> M.ForwardInfo:
        fwd = self._by_sandbox.get(sandbox_id, {}).pop(forward_id, None)
        if fwd is None:
            raise ForwardNotFound(
                f"no forward {forward_id!r}",
                hint="see `mvmctl forward NAME --list`",
                forward=forward_id,
            )
        await self._unbind(fwd)
        self.db.remove_forward(forward_id)
        _audit("port.closed", fwd.rec)
        return forward_info(fwd.rec)

    async def remove_all(self, sandbox_id: str) -> None:
        """Close and forget every forward of a sandbox (down, failure)."""
        for fwd in list(self._by_sandbox.pop(sandbox_id, {}).values()):
            await self._unbind(fwd)
            _audit("port.closed", fwd.rec)
        self.db.remove_forwards(sandbox_id)
        self._active.pop(sandbox_id, None)

    async def restore(self, sandbox_id: str) -> list[str]:
        """Bind the stored forwards of a reattached sandbox again; returns what failed."""
        problems = []
        mine = self._by_sandbox.setdefault(sandbox_id, {})
        for rec in self.db.forwards(sandbox_id):
            if rec.id in mine:
                continue
            try:
                mine[rec.id] = await self._bind(rec)
            except MvmError as exc:
                problems.append(f"forward {rec.host}:{rec.host_port} -> {rec.guest_port}: {exc}")
                self.db.remove_forward(rec.id)
                _audit("port.closed", rec, reason=str(exc)[:200])
        return problems

    async def close(self) -> None:
        """Stop listening (mvmd shutdown); records stay for the next mvmd."""
        for mine in self._by_sandbox.values():
            for fwd in mine.values():
                await self._unbind(fwd)
        self._by_sandbox.clear()

    # -- plumbing ---------------------------------------------------------------------
    async def _bind(self, rec: ForwardRecord) -> Forward:
        holder: list[Forward] = []

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._serve(holder[0], r, w)

        try:
            server = await asyncio.start_server(
                on_conn, rec.host, rec.host_port, reuse_address=True, backlog=64
            )
        except OSError as exc:
            where = f"{rec.host}:{rec.host_port}"
            if exc.errno == errno.EADDRINUSE:
                raise InvalidArgument(
                    f"host port {rec.host_port} is already in use ({where})",
                    hint="pick another host port, or give only the guest port for any free one",
                    host=rec.host,
                    host_port=rec.host_port,
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InvalidArgument(
                    f"{rec.host} is not an address of this host",
                    hint="bind 127.0.0.1 (the default) or one of this host's addresses",
                    host=rec.host,
                ) from None
            if exc.errno == errno.EACCES:
                raise InvalidArgument(
                    f"not allowed to bind {where}",
                    hint="ports below 1024 need privileges; pick a higher port",
                    host_port=rec.host_port,
                ) from None
            raise HostError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        fwd = Forward(rec, server)
        holder.append(fwd)
        return fwd

    async def _unbind(self, fwd: Forward) -> None:
        fwd.server.close()
        for t in list(fwd.conns):
            t.cancel()
        if fwd.conns:
            await asyncio.wait(list(fwd.conns), timeout=5.0)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await fwd.server.wait_closed()

    async def _serve(
        self, fwd: Forward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        sid = fwd.rec.sandbox_id
        counted = False
        fwd.conns.add(task)
        try:
            if (
                len(fwd.conns) > MAX_CONNS_PER_FORWARD
                or self._active.get(sid, 0) >= MAX_CONNS_PER_SANDBOX
            ):
                self.refused += 1
                log.warning("forward %s: connection limit reached; closing one", fwd.rec.id)
                return
            self._active[sid] = self._active.get(sid, 0) + 1
            counted = True
            try:
                agent = self.agent_for(sid)
                stream = await agent.tcp_open(fwd.rec.guest_port, timeout=OPEN_TIMEOUT)
            except MvmError as exc:
                log.info("forward %s: %s", fwd.rec.id, exc)
                return
            try:
                if await relay(reader, writer, stream, self.idle_timeout):
                    self.idle_closed += 1
                    log.info(
                        "forward %s: connection idle for %gs; closed",
                        fwd.rec.id,
                        self.idle_timeout,
                    )
            except (MvmError, OSError) as exc:
                log.info("forward %s: connection ended: %s", fwd.rec.id, exc)
            finally:
                await stream.close()
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug: never take the listener down with it
            log.exception("forward %s: relay failed", fwd.rec.id)
        finally:
            if counted:
                self._active[sid] = max(0, self._active.get(sid, 1) - 1)
            fwd.conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await writer.wait_closed()
