"""One TTL reaper pass with a fake clock (mvm.daemon.reaping.due): which sandboxes a pass
stops, decided from records and a given time, with no sleep and no VM."""

from __future__ import annotations

from dataclasses import dataclass

from mvm import state
from mvm.daemon import reaping


@dataclass(frozen=True)
class Rec:
    name: str
    state: str
    expires_at: float


def test_live_states_are_the_state_machine_s() -> None:
    assert frozenset({state.RUNNING, state.PAUSED}) == reaping.LIVE_STATES


def test_a_pass_stops_exactly_the_expired_live_sandboxes() -> None:
    clock = 1_000.0
    recs = [
        Rec("old-running", state.RUNNING, 999.0),
        Rec("old-paused", state.PAUSED, 500.0),
        Rec("at-the-second", state.RUNNING, 1_000.0),
        Rec("young", state.RUNNING, 1_000.5),
        Rec("old-stopped", state.STOPPED, 1.0),
        Rec("old-failed", state.FAILED, 1.0),
        Rec("old-creating", state.CREATING, 1.0),
        Rec("old-stopping", state.STOPPING, 1.0),
    ]
    assert reaping.due(recs, clock) == ["old-running", "old-paused", "at-the-second"]


def test_the_clock_moving_on_makes_a_young_sandbox_due() -> None:
    recs = [Rec("b", state.RUNNING, 1_006.0), Rec("a", state.PAUSED, 1_003.0)]
    assert reaping.due(recs, 1_000.0) == []
    assert reaping.due(recs, 1_003.0) == ["a"]
    assert reaping.due(recs, 1_005.999) == ["a"]
    assert reaping.due(recs, 1_006.0) == ["b", "a"]


def test_an_extended_ttl_is_not_due() -> None:
    """set-ttl replaces expires_at: the pass after the old deadline leaves the sandbox."""
    before = Rec("ttl-b", state.RUNNING, 1_006.0)
    extended = Rec("ttl-b", state.RUNNING, 1_000.0 + 3_600)
    assert reaping.due([before], 1_010.0) == ["ttl-b"]
    assert reaping.due([extended], 1_010.0) == []


def test_sandbox_records_fit_the_protocol() -> None:
    """The manager's own records (state.SandboxRecord) are what it passes in."""
    fields = state.SandboxRecord.__struct_fields__
    assert {"name", "state", "expires_at"} <= set(fields)
