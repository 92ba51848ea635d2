"""The append-only JSONL audit log of one tenant, shared by mvmd and CLI processes.

Each line is one record::

    {"seq": 7, "id": "…", "time": "2025-…Z", "tenant": "default", "actor": "mvmd",
     "event": "cmd.exec.finished", "sandbox": "web", "data": {…},
     "prev": "<sha256 of line 6>", "key": "<host key fingerprint>", "sig": "<Ed25519>"}

Appends take an exclusive ``flock`` on the file (bounded wait), read the last
line, and write the new line with one ``write`` on an ``O_APPEND`` descriptor, so
several processes and threads never interleave or fork the chain.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import fcntl
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mvm import names, paths
from mvm.audit import keys
from mvm.audit.encoding import (
    GENESIS,
    MAX_RECORD_BYTES,
    AuditError,
    canonical,
    check_fields,
    record_hash,
    sha256_hex,
    signed_body,
)

#: How long an append waits for another process's lock before failing.
LOCK_TIMEOUT_S = 5.0

#: Longest line ``tail``/``show`` will parse (a bigger one is reported, not loaded).
MAX_LINE_BYTES = MAX_RECORD_BYTES + 4096

_EVENT_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


#: The tenant and actor the current request acts for: set by mvmd around a request that
#: `mvmctl serve` relayed for a tenant (``mvm.daemon.tenant_hook``); they win over
#: ``MVM_TENANT`` and the default actor, for that request only.
_ACTING: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "mvm_audit_acting", default=None
)


@contextlib.contextmanager
def acting_for(tenant_name: str, actor: str) -> Iterator[None]:
    """Records made inside go to ``tenant_name``'s chain, with ``actor`` as actor."""
    if not names.is_valid("tenant", tenant_name):
        raise AuditError(f"invalid tenant {tenant_name!r}")
    token = _ACTING.set((tenant_name, actor[:64]))
    try:
        yield
    finally:
        _ACTING.reset(token)


def acting() -> tuple[str, str] | None:
    """``(tenant, actor)`` of the request being served for a tenant, if any."""
    return _ACTING.get()


#: Who acts for the host's owner in this request (``X-Mvm-Actor`` on mvmd's own socket,
#: ``MVM_ACTOR``, ``Client(actor=)``): the actor of records mvmd would sign as ``mvmd``.
_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("mvm_audit_label", default=None)
ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")


@contextlib.contextmanager
def labelled(actor: str) -> Iterator[None]:
    """Records made inside name ``actor`` (checked: ``ACTOR_RE``) instead of ``mvmd``."""
    if not ACTOR_RE.fullmatch(actor):
        raise AuditError(f"invalid actor {actor[:80]!r}", hint="letters, digits, '_.:@-' (64)")
    token = _LABEL.set(actor)
    try:
        yield
    finally:
        _LABEL.reset(token)


@contextlib.contextmanager
def on_own() -> Iterator[None]:
    """Records made inside are mvmd's own (actor ``mvmd``), even in a task that inherited
    a request's tenant and actor: a guest's exit event, a failure found, an egress
    decision are observations, not the caller's acts."""
    acting_token, label_token = _ACTING.set(None), _LABEL.set(None)
    try:
        yield
    finally:
        _LABEL.reset(label_token)
        _ACTING.reset(acting_token)


def own_context() -> contextvars.Context:
    """A copy of the current context without a request's tenant and actor: for tasks
    that outlive the request (listeners, readers)."""
    ctx = contextvars.copy_context()
    ctx.run(_ACTING.set, None)
    ctx.run(_LABEL.set, None)
    return ctx


#: Lookups ``sandbox name -> tenant`` registered by each sandbox service (weakly): a
#: record about a sandbox goes to the chain of the tenant that owns it, whoever acts,
#: also when mvmd acts on its own between requests (TTL, guest events, egress).
_routes: list[weakref.WeakMethod[Callable[[str], str | None]]] = []
_routes_lock = threading.Lock()


def route_sandboxes(lookup: Callable[[str], str | None]) -> None:
    """Register a bound method answering which tenant owns a sandbox (None: not its own
    or the host owner's); it is dropped when its object goes."""
    with _routes_lock:
        _routes[:] = [r for r in _routes if r() is not None]
        _routes.append(weakref.WeakMethod(lookup))


def sandbox_tenant(sandbox: str | None) -> str | None:
    """The tenant owning ``sandbox`` by the registered lookups, if one knows it."""
    if not sandbox:
        return None
    with _routes_lock:
        lookups = [r() for r in _routes]
    for fn in lookups:
        t = fn(sandbox) if fn is not None else None
        if t is not None:
            return t
    return None


def tenant() -> str:
    """The tenant whose log records go to: the request's (``acting_for``), else
    ``MVM_TENANT``, else ``default``."""
    acting = _ACTING.get()
    if acting is not None:
        return acting[0]
    t = os.environ.get("MVM_TENANT", "") or "default"
    if not names.is_valid("tenant", t):
        raise AuditError(
            f"invalid MVM_TENANT {t!r}",
            hint="use letters, digits, '_', '.', '-' (at most 64)",
        )
    return t


def audit_dir() -> Path:
    return paths.home() / "audit"


def default_path() -> Path:
    return audit_dir() / f"{tenant()}.jsonl"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def last_line(f: Any) -> bytes | None:
    """The last complete line of an open binary file (``None`` if empty), reading from the end."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return None
    block = 8192
    pos = end
    buf: bytes = b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        body = buf[:-1] if buf.endswith(b"\n") else buf
        nl = body.rfind(b"\n")
        if nl >= 0:
            return body[nl + 1 :]
        if len(buf) > MAX_LINE_BYTES * 2:
            break
    return bytes(buf).rstrip(b"\n")


class AuditLog:
    """One tenant's log file plus the host key that signs it."""

    def __init__(self, path: Path, *, tenant_name: str = "default") -> None:
        self.path = path
        self.tenant = tenant_name
        self._lock = threading.Lock()

    @property
    def dir(self) -> Path:
        return self.path.parent

    def append(
        self, event: str, *, actor: str = "mvmd", sandbox: str | None = None, **fields: Any
    ) -> str:
        """Sign and chain one record; return its id. Fields are metadata only."""
        if not _EVENT_RE.match(event) or len(event) > 64:
            raise AuditError(f"invalid audit event name {event!r}", hint="use dotted.lower_case")
        data = check_fields(fields)
        acting = _ACTING.get()
        if actor == "mvmd":
            if acting is not None and acting[0] == self.tenant:
                actor = acting[1]
            elif acting is None:
                actor = _LABEL.get() or actor
        hk = keys.load_or_create(self.dir)
        with self._lock, self._locked() as f:
            last = last_line(f)
            seq, prev = 1, GENESIS
            if last is not None:
                prev = record_hash(last)
                seq = _seq_of(last, f) + 1
            rec: dict[str, Any] = {
                "seq": seq,
                "time": _now(),
                "tenant": self.tenant,
                "actor": str(actor)[:64],
                "event": event,
                "sandbox": sandbox,
                "data": data,
                "prev": prev,
                "key": hk.fingerprint[:16],
            }
            rec["id"] = f"{seq}-{sha256_hex(canonical(rec))[:12]}"
            rec["sig"] = keys.sign(hk.private, signed_body(rec))
            line = canonical(rec)
            if len(line) > MAX_RECORD_BYTES:
                raise AuditError(
                    f"audit record for {event} is {len(line)} bytes (limit {MAX_RECORD_BYTES})",
                    hint="fields are metadata: pass hashes and sizes, not contents",
                )
            f.seek(0, os.SEEK_END)
            # A crash may have left a partial line: terminate it so the new record
            # stands on its own line (verify still reports the damaged one).
            tail = b""
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    tail = b"\n"
            os.write(f.fileno(), tail + line + b"\n")
            if os.environ.get("MVM_AUDIT_FSYNC", "1") != "0":
                os.fdatasync(f.fileno())
            return str(rec["id"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        f = os.fdopen(fd, "r+b", buffering=0)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AuditError(
                            f"audit log {self.path} stayed locked for {LOCK_TIMEOUT_S:.0f}s",
                            hint="another mvm process is stuck holding it; find it with fuser",
                            path=str(self.path),
                        ) from None
                    time.sleep(0.002)
            yield f
        finally:
            f.close()

    def locked_lines(self) -> list[bytes]:
        """Every line, read under the append lock (no half-written last line)."""
        if not self.path.exists():
            return []
        with self._locked() as f:
            f.seek(0)
            data: bytes = f.read()
        return data.splitlines(keepends=True)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number from 1, raw line) for every line, including damaged ones."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            yield from enumerate(f, 1)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every parsable record in file order (damaged lines skipped; see verify)."""
        for _n, line in self.lines():
            rec = parse_line(line)
            if rec is not None:
                yield rec

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` parsable records."""
        out: list[dict[str, Any]] = []
        for rec in self.records():
            out.append(rec)
            if len(out) > n:
                out.pop(0)
        return out

    def find(self, ident: str) -> dict[str, Any] | None:
        """The record with this id, id prefix, or sequence number."""
        ident = ident.strip()
        for rec in self.records():
            rid = str(rec.get("id", ""))
            if rid == ident or (len(ident) >= 4 and rid.startswith(ident)):
                return rec
            if ident.isdigit() and rec.get("seq") == int(ident):
                return rec
        return None

    def follow(self, *, poll_s: float = 0.2, start_at_end: bool = True) -> Iterator[dict[str, Any]]:
        """Yield records as they are appended (forever; the caller stops iterating).

        The starting point is taken now, not at the first ``next()``.
        """
        pos = 0
        if start_at_end:
            with contextlib.suppress(FileNotFoundError):
                pos = self.path.stat().st_size
        return self._follow_from(pos, poll_s)

    def _follow_from(self, pos: int, poll_s: float) -> Iterator[dict[str, Any]]:
        pending = b""
        while True:
            try:
                with open(self.path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < pos:  # replaced/truncated: start over
                        pos, pending = 0, b""
                    f.seek(pos)
                    chunk = f.read(1 << 20)
                    pos += len(chunk)
            except FileNotFoundError:
                chunk = b""
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                rec = parse_line(line)
                if rec is not None:
                    yield rec
            if not chunk:
                time.sleep(poll_s)


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A record from one line, or ``None`` if it is not a JSON object."""
    if len(line) > MAX_LINE_BYTES:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _int_seq(rec: dict[str, Any] | None) -> int | None:
    seq = rec.get("seq") if rec else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
        return seq
    return None


def _seq_of(line: bytes, f: Any) -> int:
    """Sequence number of the last record; if that line is damaged, the last good one + lines after."""
    seq = _int_seq(parse_line(line))
    if seq is not None:
        return seq
    f.seek(0)
    best, after = 0, 0
    for raw in f:
        s = _int_seq(parse_line(raw))
        if s is not None:
            best, after = s, 0
        else:
            after += 1
    return best + after


_logs: dict[tuple[Path, str], AuditLog] = {}
_logs_lock = threading.Lock()


def default_log(sandbox: str | None = None) -> AuditLog:
    """The log for the current ``MVM_HOME`` and tenant (resolved on every call): the
    tenant owning ``sandbox`` when a service knows it, else :func:`tenant`."""
    t = sandbox_tenant(sandbox) or tenant()
    path = audit_dir() / f"{t}.jsonl"
    with _logs_lock:
        log = _logs.get((path, t))
        if log is None:
            log = _logs[(path, t)] = AuditLog(path, tenant_name=t)
        return log
