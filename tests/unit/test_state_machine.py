"""The sandbox state machine: the whole transition table, the one guarded method, and the
error a wrong-state call gets (409 naming the state). Plus the error hierarchy's statuses."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from mvm import errors
from mvm.state import TRANSITIONS, SandboxRecord, SandboxState, StateDB, check_transition

S = SandboxState
ALLOWED = {
    (S.CREATING, S.RUNNING), (S.CREATING, S.FAILED), (S.CREATING, S.STOPPING),
    (S.RUNNING, S.PAUSED), (S.RUNNING, S.STOPPING), (S.RUNNING, S.FAILED), (S.RUNNING, S.RUNNING),
    (S.PAUSED, S.RUNNING), (S.PAUSED, S.STOPPING), (S.PAUSED, S.FAILED),
    (S.STOPPING, S.STOPPED), (S.STOPPING, S.FAILED),
    (S.FAILED, S.STOPPING),
}  # fmt: skip


def test_the_table_is_exactly_the_allowed_pairs() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED
    assert set(TRANSITIONS) == set(SandboxState)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(SandboxState, SandboxState)))
def test_every_pair(old: SandboxState, new: SandboxState) -> None:
    if (old, new) in ALLOWED:
        assert check_transition("sb", old, new) is new
        return
    with pytest.raises(errors.InvalidTransition) as info:
        check_transition("sb", old, new)
    exc = info.value
    assert isinstance(exc, errors.SandboxStateError) and exc.http_status == 409
    assert f"is {old}" in exc.message and exc.data["state"] == old


def record(state: SandboxState = S.CREATING) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        id="sb-1", name="one", image="python", image_id="x", state=state, cpus=1,
        memory_mb=512, disk_mb=256, created=now, ttl_seconds=60, expires_at=now + 60,
    )  # fmt: skip


def test_the_database_changes_state_only_through_transition(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    rec = record()
    db.insert(rec)
    rec = db.transition(rec, S.RUNNING, pid=42)
    assert db.get("one") == rec and rec.state is S.RUNNING and rec.pid == 42
    with pytest.raises(errors.InvalidTransition):
        db.transition(rec, S.STOPPED)
    assert db.get("one") == rec  # nothing written
    with pytest.raises(TypeError):
        db.update(rec, state=S.STOPPED)
    rec = db.update(rec, ttl_seconds=120.0)
    assert db.get("one") == rec and rec.ttl_seconds == 120.0
    assert not hasattr(db, "save")


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.MvmError, 500, 125),
        (errors.InvalidArgument, 400, 2),
        (errors.SandboxNotFound, 404, 125),
        (errors.SandboxStateError, 409, 125),
        (errors.InvalidTransition, 409, 125),
        (errors.PolicyDenied, 403, 125),
        (errors.CommandTimeout, 504, 124),
        (errors.StateLoadError, 502, 125),
        (errors.AuditError, 500, 125),
    ],
)
def test_each_error_carries_its_status_and_exit_code(
    cls: type[errors.MvmError], status: int, code: int
) -> None:
    exc = cls("m", hint="h", sandbox="x")
    assert errors.http_status(exc) == status and exc.exit_code == code
    back = errors.from_name(cls.__name__, "m", "h", {"sandbox": "x"})
    assert type(back) is cls and back.data == {"sandbox": "x"} and back.hint == "h"


def test_agent_errors_map_by_code_and_unknown_names_to_the_base() -> None:
    assert errors.http_status(errors.AgentError("x", code="not_found")) == 404
    assert errors.http_status(errors.AgentError("x", code="???")) == 400
    assert type(errors.from_name("Exception", "m", None, {})) is errors.MvmError
    assert type(errors.from_name("NoSuchError", "m", None, {})) is errors.MvmError


def test_records_and_the_api_share_one_shape() -> None:
    from mvm.api import models as M
    from mvm.state import SnapshotRecord

    for cls in (M.CreateSandbox, SandboxRecord, SnapshotRecord):
        assert issubclass(cls, M.SandboxShape)
        assert set(M.SandboxShape.__struct_fields__) <= set(cls.__struct_fields__)
    req = M.CreateSandbox(image="python", tags={"a": "b"}, network=M.NetworkSpec(preset="dev"))
    assert M.shape_fields(req)["network"] == M.NetworkSpec(preset="dev")
    with pytest.raises(errors.InvalidArgument, match="kind"):
        M.check_shape(M.CreateSandbox(kind="browser"))
    with pytest.raises(errors.InvalidArgument, match="tags"):
        M.check_shape(M.CreateSandbox(tags={str(i): "" for i in range(M.MAX_TAGS + 1)}))


def test_records_written_before_the_one_shape_still_load(tmp_path: Path) -> None:
    import msgspec

    from mvm.state import SnapshotRecord, decode_record

    old = msgspec.json.encode(record()) .replace(b'"network":{"preset":"none","allow":[]}',
        b'"network_preset":"dev","network_allow":["pypi.org"]')  # fmt: skip
    rec = decode_record(old, SandboxRecord)
    assert rec.network.preset == "dev" and rec.network.allow == ["pypi.org"]
    snap = {
        "sandbox": "one", "name": "s", "path": "/x", "created": 1.0, "size": 1,
        "image": "python", "image_id": "x", "cpus": 1, "memory_mb": 512, "disk_mb": 256,
        "ttl_seconds": None, "network_preset": "none", "network_allow": [],
    }  # fmt: skip
    s = decode_record(msgspec.json.encode(snap), SnapshotRecord)
    assert s.ttl_seconds == 1800.0 and s.network.preset == "none"
