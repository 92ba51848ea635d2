"""The cluster front's bodies to hosts' mvmds: live migration, and placement records.

Kept beside ``api.models`` (not in it) so the verb stays one self-contained addition.
The key is a one-off 256-bit TLS pre-shared key for QEMU's migration stream; it travels
only in these bodies, over the hosts' authenticated API, and is never logged or stored.
"""

from __future__ import annotations

import msgspec

from mvm.api.models import PortSpec, SandboxShape


class MigrationPlan(SandboxShape, kw_only=True):
    """What the source says about a sandbox about to move (its shape and facts)."""

    id: str
    image_id: str
    expires_at: float
    created: float = 0.0
    forwards: list[PortSpec] = msgspec.field(default_factory=list)
    procs: list[int] = msgspec.field(default_factory=list)
    #: Whose it is (a tenant's sandbox stays that tenant's, audited in its chain there).
    tenant: str | None = None
    token_id: str | None = None


class MigrateIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    plan: MigrationPlan
    #: The address the destination QEMU listens on (the host's private address).
    listen: str
    key: str
    source_host: str = ""


class Listening(msgspec.Struct, kw_only=True):
    id: str
    port: int


class MigrateOut(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    uri: str  # tcp:HOST:PORT
    key: str
    to_host: str = ""


class MigrationStats(msgspec.Struct, kw_only=True):
    downtime_ms: int | None = None
    total_ms: int | None = None
    setup_ms: int | None = None
    ram_bytes: int | None = None
    dirty_sync_count: int | None = None
    wall_seconds: float = 0.0


class Commit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    to_host: str = ""


class FailedTry(msgspec.Struct, kw_only=True):
    host: str
    error: str


class Placed(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the cluster front placed a sandbox, and the hosts that failed first."""

    host: str
    shape: str
    policy: str
    failed: list[FailedTry] = msgspec.field(default_factory=list)
