"""E2B snapshot ids (``<sandbox id>:<snapshot>``) map to the tenant's own names only."""

from __future__ import annotations

import pytest

from mvm import errors, tenancy
from mvm.e2b.snapshots import no_filesystem_only, parse_snapshot_id, snapshot_id
from mvm.tokens import Identity

ACME = Identity(token_id="t0123456789ab", tenant="acme", scopes=("e2b",))


def test_snapshot_ids_round_trip_into_the_tenants_names() -> None:
    sid = snapshot_id("sb-1", "snap-one")
    assert sid == "sb-1:snap-one"
    assert parse_snapshot_id(ACME, sid) == (tenancy.to_service("acme", "sb-1"), "snap-one")


@pytest.mark.parametrize("template", ["python", "base", "python-3.11", ""])
def test_templates_are_not_snapshots(template: str) -> None:
    assert parse_snapshot_id(ACME, template) is None


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("sb-1:", errors.SnapshotNotFound),  # a bad snapshot name: that snapshot is not there
        ("sb-1:../x", errors.SnapshotNotFound),
        ("sb-1:A/B", errors.SnapshotNotFound),
        ("../x:snap", errors.SandboxNotFound),  # a bad sandbox id: that sandbox is not there
        (":snap", errors.SandboxNotFound),
    ],
)
def test_malformed_snapshot_ids_are_not_found(bad: str, error: type[errors.MvmError]) -> None:
    with pytest.raises(error) as info:
        parse_snapshot_id(ACME, bad)
    assert type(info.value) is error


def test_filesystem_only_variants_are_refused() -> None:
    no_filesystem_only({}, "pause")
    no_filesystem_only({"memory": True}, "pause")
    with pytest.raises(errors.InvalidArgument, match="filesystem-only pause"):
        no_filesystem_only({"memory": False}, "pause")
