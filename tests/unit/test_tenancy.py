"""The tenant rule: each tenant's names live under its own prefix; nobody reaches another's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm import names, tenancy
from mvm.errors import InvalidArgument, SandboxNotFound

TENANTS = st.from_regex(names.MIXED_RE, fullmatch=True)
SANDBOXES = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,40}", fullmatch=True)


@given(TENANTS, TENANTS, SANDBOXES)
def test_names_round_trip_and_stay_in_their_tenant(a: str, b: str, name: str) -> None:
    full = tenancy.to_service(a, name)
    assert names.is_valid("sandbox", full)
    assert tenancy.owns(a, full) and tenancy.from_service(a, full) == name
    if tenancy.prefix(a) != tenancy.prefix(b) and b != tenancy.LOCAL:
        assert not tenancy.owns(b, full)


def test_local_owner_has_no_prefix_and_sees_all() -> None:
    assert tenancy.prefix("default") == ""
    assert tenancy.owns("default", tenancy.to_service("acme", "web"))


def test_bad_or_too_long_names_are_not_found_for_a_caller() -> None:
    with pytest.raises(SandboxNotFound):
        tenancy.sandbox_for("acme", "../x")
    with pytest.raises(SandboxNotFound):
        tenancy.sandbox_for("acme", "a" * 60)
    with pytest.raises(InvalidArgument):
        tenancy.to_service("acme", "a" * 60)
    with pytest.raises(InvalidArgument):
        tenancy.prefix("bad/tenant")


def test_secrets_and_generated_names_are_prefixed() -> None:
    assert tenancy.to_service("acme", "KEY", "secret").startswith(tenancy.prefix("acme"))
    n = tenancy.new_name("acme")
    assert tenancy.owns("acme", n) and names.is_valid("sandbox", n)
    p = tenancy.prefix("acme")
    assert tenancy.unprefix_text("acme", f"sandbox {p}web not found") == "sandbox web not found"
