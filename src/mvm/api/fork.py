"""The fork API's bodies: a request for children of a running sandbox, and what came of it.

Kept beside ``api.models`` (not in it) so the fork verb stays one self-contained addition.
"""

from __future__ import annotations

import msgspec

from mvm.api.models import SandboxInfo

#: Most children one fork call may ask for (each is a whole VM).
MAX_CHILDREN = 16


class ForkRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: The child's name; with ``count`` > 1 the children are ``NAME-1`` .. ``NAME-N``.
    name: str
    count: int = 1


class RestoreAs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Restore a snapshot into a new sandbox named ``name`` (the source is left alone)."""

    name: str


class ForkResult(msgspec.Struct, kw_only=True):
    source: str
    #: How long the source's CPUs stood still for the snapshot.
    pause_seconds: float
    #: The whole call, snapshot to every child answering.
    seconds: float
    #: Seconds per stage: ``snapshot`` (pre-copy save), ``image`` (loaded once into
    #: shared RAM), ``children`` (every child restored and answering its handshake).
    stages: dict[str, float] = {}
    children: list[SandboxInfo] = []


def child_names(name: str, count: int) -> list[str]:
    """The children's names: ``name`` alone, or ``name-1`` .. ``name-count``."""
    return [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
