"""Which sandboxes one reaper pass must stop for their TTL: a pure function of the records
and a clock, so the rule is unit-tested with a fake clock instead of a sleeping test."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

#: States in which a sandbox holds a VM and so can run out of time.
LIVE_STATES = frozenset({"running", "paused"})


class Expiring(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def expires_at(self) -> float: ...


def due(records: Iterable[Expiring], now: float) -> list[str]:
    """Names of the live (running or paused) sandboxes whose TTL ends at or before ``now``,
    in the order given. Stopped, failed or still-creating ones are never due."""
    return [r.name for r in records if r.state in LIVE_STATES and r.expires_at <= now]


__all__ = ["LIVE_STATES", "due"]
