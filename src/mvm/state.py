"""Durable sandbox state: SQLite in WAL mode under ``MVM_HOME``.

Every state transition is written here *before* it is acted on, so a daemon
that is killed at any point finds, on restart, what it was doing and can finish
or undo it (reattach to a running QEMU, mark a vanished one failed).
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from mvm.api.models import SandboxShape
from mvm.errors import InvalidTransition

R = TypeVar("R", bound=SandboxShape)


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its life. Changed only by ``StateDB.transition``."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


CREATING = SandboxState.CREATING
RUNNING = SandboxState.RUNNING
PAUSED = SandboxState.PAUSED
STOPPING = SandboxState.STOPPING
STOPPED = SandboxState.STOPPED
FAILED = SandboxState.FAILED
LIVE_STATES = frozenset({CREATING, RUNNING, PAUSED, STOPPING})
#: The whole state machine: every change the daemon may make (RUNNING -> RUNNING is a
#: snapshot restore into a running sandbox; a failure can happen in every live state).
TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    CREATING: frozenset({RUNNING, FAILED, STOPPING}),
    RUNNING: frozenset({PAUSED, STOPPING, FAILED, RUNNING}),
    PAUSED: frozenset({RUNNING, STOPPING, FAILED}),
    STOPPING: frozenset({STOPPED, FAILED}),
    STOPPED: frozenset(),
    FAILED: frozenset({STOPPING}),
}


def check_transition(name: str, old: str, new: str) -> SandboxState:
    """The new state if ``old -> new`` is in the table; else InvalidTransition (HTTP 409)
    naming the sandbox's state. Pure."""
    target = SandboxState(new)
    if target not in TRANSITIONS.get(SandboxState(old), frozenset()):
        raise InvalidTransition(
            f"sandbox {name} is {old}: it cannot become {new}",
            sandbox=name,
            state=str(old),
            target=str(new),
        )
    return target


SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    doc BLOB NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS forwards (
    id TEXT PRIMARY KEY,
    sandbox TEXT NOT NULL,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    sandbox TEXT NOT NULL,
    name TEXT NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (sandbox, name)
);
"""


class SandboxRecord(SandboxShape, kw_only=True):
    """What the daemon knows about one sandbox (everything needed to reattach): its shape
    as created (image resolved, disk sized, env merged) and the facts of its life."""

    id: str
    name: str
    image_id: str
    state: SandboxState
    disk_mb: int = 0
    created: float
    expires_at: float
    pid: int | None = None
    run_dir: str = ""
    memory_file: str | None = None  # the template RAM file a clone maps (for snapshots)
    reason: str = ""
    #: Whose sandbox it is: the tenant a request relayed by `mvmctl serve` spoke for
    #: (None: the host owner's) and the token id it came with. Every record about the
    #: sandbox, also those mvmd makes on its own (TTL, guest events, failures, egress),
    #: goes to this tenant's chain.
    tenant: str | None = None
    token_id: str | None = None
    #: Per-command cgroup limits asked for at create (``CreateSandbox.limits``); the guest
    #: keeps them across an mvmd restart, and a fork or snapshot carries them in its memory.
    limits: dict[str, int] | None = None

    def ttl_left(self, now: float | None = None) -> float:
        return max(0.0, self.expires_at - (now if now is not None else time.time()))


class SnapshotRecord(SandboxShape, kw_only=True):
    """A saved sandbox: its shape (secret names are not kept: a recreated sandbox gets
    only what the snapshot's caller gives again) and where the state file is."""

    sandbox: str  # sandbox name
    name: str
    path: str  # directory holding the state file and meta
    created: float
    size: int
    image_id: str
    disk_mb: int = 0
    memory_file: str | None = None


def _upgraded(doc: dict[str, Any]) -> dict[str, Any]:
    """A record written before the shape was one struct: network_preset/network_allow
    become ``network``; a snapshot's unknown TTL becomes the default."""
    if "network_preset" in doc or "network_allow" in doc:
        doc["network"] = {
            "preset": doc.pop("network_preset", "none"),
            "allow": doc.pop("network_allow", []),
        }
    if doc.get("ttl_seconds", 0) is None:
        del doc["ttl_seconds"]
    return doc


def decode_record(raw: bytes | str, typ: type[R]) -> R:
    """A stored record (SQLite row or snapshot.json), older layouts included."""
    doc = msgspec.json.decode(raw)
    if not isinstance(doc, dict):
        raise msgspec.ValidationError("a record must be a JSON object")
    return msgspec.convert(_upgraded(doc), typ)


class ForwardRecord(msgspec.Struct, kw_only=True):
    """A port forward of a sandbox (by sandbox id): a restarted mvmd binds it again."""

    id: str
    sandbox_id: str
    sandbox: str  # name, for messages and audit
    host: str
    host_port: int
    guest_port: int
    wildcard: bool = False
    created: float = 0.0
    audit_id: str | None = None


class StateDB:
    """A small, thread-safe facade over SQLite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sandboxes ----------------------------------------------------------------
    def insert(self, rec: SandboxRecord) -> None:
        """Add a sandbox; raises sqlite3.IntegrityError if the name is taken."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO sandboxes (id, name, state, doc, updated) VALUES (?, ?, ?, ?, ?)",
                (rec.id, rec.name, rec.state, msgspec.json.encode(rec), time.time()),
            )

    def _save(self, rec: SandboxRecord) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE sandboxes SET state = ?, doc = ?, updated = ? WHERE id = ?",
                (rec.state, msgspec.json.encode(rec), time.time(), rec.id),
            )

    def transition(
        self, rec: SandboxRecord, new_state: str, reason: str = "", **changes: Any
    ) -> SandboxRecord:
        """The one way a sandbox changes state: checked against TRANSITIONS, written, and
        returned as the new record (with ``changes`` to other fields, e.g. its pid)."""
        target = check_transition(rec.name, rec.state, new_state)
        new = msgspec.structs.replace(rec, **changes, state=target, reason=reason or rec.reason)
        self._save(new)
        return new

    def update(self, rec: SandboxRecord, **changes: Any) -> SandboxRecord:
        """Change fields other than the state (TTL, pid after a restore) and write them."""
        if "state" in changes:
            raise TypeError("state changes go through transition()")
        new = msgspec.structs.replace(rec, **changes)
        self._save(new)
        return new

    def delete(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def get(self, name: str) -> SandboxRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT doc FROM sandboxes WHERE name = ? OR id = ?", (name, name)
            ).fetchone()
        return decode_record(row[0], SandboxRecord) if row else None

    def all(self) -> list[SandboxRecord]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM sandboxes ORDER BY name").fetchall()
        return [decode_record(r[0], SandboxRecord) for r in rows]

    # -- port forwards ------------------------------------------------------------
    def add_forward(self, fwd: ForwardRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO forwards (id, sandbox, doc) VALUES (?, ?, ?)",
                (fwd.id, fwd.sandbox_id, msgspec.json.encode(fwd)),
            )

    def forwards(self, sandbox_id: str) -> list[ForwardRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT doc FROM forwards WHERE sandbox = ? ORDER BY rowid", (sandbox_id,)
            ).fetchall()
        return [msgspec.json.decode(r[0], type=ForwardRecord) for r in rows]

    def remove_forward(self, forward_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM forwards WHERE id = ?", (forward_id,))

    def remove_forwards(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM forwards WHERE sandbox = ?", (sandbox_id,))

    # -- snapshots ----------------------------------------------------------------
    def add_snapshot(self, snap: SnapshotRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO snapshots (sandbox, name, doc) VALUES (?, ?, ?)",
                (snap.sandbox, snap.name, msgspec.json.encode(snap)),
            )

    def snapshots(self, sandbox: str) -> list[SnapshotRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT doc FROM snapshots WHERE sandbox = ? ORDER BY name", (sandbox,)
            ).fetchall()
        return [decode_record(r[0], SnapshotRecord) for r in rows]

    def snapshot(self, sandbox: str, name: str) -> SnapshotRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT doc FROM snapshots WHERE sandbox = ? AND name = ?", (sandbox, name)
            ).fetchone()
        return decode_record(row[0], SnapshotRecord) if row else None

    def remove_snapshot(self, sandbox: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE sandbox = ? AND name = ?", (sandbox, name))
