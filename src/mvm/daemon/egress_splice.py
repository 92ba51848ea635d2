"""One relayed egress connection: copy bytes both ways under per-connection limits.

The proxy (``egress.py``) decides whether a connection may exist; this decides how long
and how much it may carry. ``Limits`` is mvmd's configuration (``EgressProxy(limits=)``, by default
``Limits.from_env()``):
an idle timeout, a byte cap (both directions together) and a total-time cap. The proxy
audits the byte and time caps as ``egress.limit`` (``audit_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mvm.durations import parse_duration
from mvm.errors import InvalidArgument
from mvm.policy import network as N

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
#: Seconds a relayed connection may move no byte either way.
IDLE_TIMEOUT = 300.0
#: Per relayed connection: bytes both ways together, and seconds from the upstream connect.
MAX_CONN_BYTES = 1 << 30
MAX_CONN_SECONDS = 3600.0
#: Environment overrides read by ``Limits.from_env`` (mvmd's environment).
ENV_MAX_BYTES = "MVM_EGRESS_MAX_BYTES"
ENV_MAX_TIME = "MVM_EGRESS_MAX_TIME"
ENV_IDLE = "MVM_EGRESS_IDLE_TIMEOUT"


@dataclass(frozen=True)
class Limits:
    """What one relayed connection may use; ``EgressProxy(limits=...)`` (mvmd's config)."""

    max_bytes: int = MAX_CONN_BYTES
    max_seconds: float = MAX_CONN_SECONDS
    idle_seconds: float = IDLE_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_seconds <= 0 or self.idle_seconds <= 0:
            raise InvalidArgument(f"egress limits must be positive: {self}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The defaults, overridden by ``MVM_EGRESS_MAX_BYTES`` (bytes),
        ``MVM_EGRESS_MAX_TIME`` and ``MVM_EGRESS_IDLE_TIMEOUT`` (seconds or 30m, 1h...)."""
        env = os.environ if environ is None else environ
        max_bytes = MAX_CONN_BYTES
        if raw := env.get(ENV_MAX_BYTES, "").strip():
            if not raw.isdigit() or int(raw) < 1:
                raise InvalidArgument(
                    f"invalid {ENV_MAX_BYTES}={raw!r}", hint="a positive number of bytes"
                )
            max_bytes = int(raw)
        times = {}
        for name, default in ((ENV_MAX_TIME, MAX_CONN_SECONDS), (ENV_IDLE, IDLE_TIMEOUT)):
            raw = env.get(name, "").strip()
            times[name] = parse_duration(raw, name) if raw else default
        return cls(max_bytes, times[ENV_MAX_TIME], times[ENV_IDLE])


@dataclass(frozen=True)
class SpliceEnd:
    """How a relayed connection ended: ``limit`` is "bytes", "time", "idle" or None."""

    limit: str | None
    bytes: int
    seconds: float


async def splice(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
    limits: Limits,
) -> SpliceEnd:
    """Copy both ways until both sides are done, or until a limit ends it: more than
    ``max_bytes`` in all (what fits is passed on), open ``max_seconds``, or nothing moved
    for ``idle_seconds``. A cut connection gets no clean EOF from here: the caller closes."""
    start = time.monotonic()
    last = start
    moved = 0
    hit: str | None = None

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal last, moved, hit
        try:
            while hit is None:
                data = await r.read(CHUNK)
                if not data:
                    break
                last = time.monotonic()
                room = limits.max_bytes - moved
                if len(data) > room:
                    data, hit = data[:room], "bytes"
                moved += len(data)
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            if hit is None:
                with contextlib.suppress(OSError):
                    if w.can_write_eof():
                        w.write_eof()

    up = asyncio.ensure_future(pump(a_r, b_w))
    down = asyncio.ensure_future(pump(b_r, a_w))
    pending: set[asyncio.Future[None]] = {up, down}
    try:
        while pending and hit is None:
            now = time.monotonic()
            if now >= start + limits.max_seconds:
                hit = "time"
                break
            if now >= last + limits.idle_seconds:
                hit = "idle"
                break
            wake = min(start + limits.max_seconds, last + limits.idle_seconds)
            done, pending = await asyncio.wait(
                pending, timeout=wake - now, return_when=asyncio.FIRST_COMPLETED
            )
            if down in done:  # upstream finished: the guest side has had everything
                break
    finally:
        for t in (up, down):
            t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    return SpliceEnd(hit, moved, time.monotonic() - start)


def audit_limit(sandbox: str, t: N.Target, end: SpliceEnd, cap: float) -> str | None:
    """Write one ``egress.limit`` record (which limit, its value, what was used)."""
    try:
        from mvm import audit

        return audit.record(
            "egress.limit",
            sandbox=sandbox,
            host=t.host,
            port=t.port,
            limit=end.limit,
            max=cap,
            bytes=end.bytes,
            seconds=round(end.seconds, 3),
        )
    except Exception as exc:  # the audit log failing must not take the proxy down
        log.warning("egress limit for %s not audited: %s", sandbox, exc)
        return None
