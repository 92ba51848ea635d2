"""Audit routing by the sandbox's owner: a record about a tenant's sandbox goes to the
tenant's chain whoever acts (a relayed request, the owner, or mvmd on its own), with
the actor the request named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mvm import audit, tenancy
from mvm.audit.encoding import AuditError
from mvm.audit.log import acting_for, labelled, route_sandboxes, sandbox_tenant
from mvm.state import SandboxRecord, StateDB, decode_record


class Owners:
    """What a sandbox service registers: name -> tenant."""

    def __init__(self, table: dict[str, str | None]) -> None:
        self.table = table

    def tenant_of(self, name: str) -> str | None:
        return self.table.get(name)


def chain(home: Path, tenant: str) -> list[tuple[str, str, str | None]]:
    p = home / "audit" / f"{tenant}.jsonl"
    if not p.exists():
        return []
    recs = [json.loads(x) for x in p.read_text().splitlines()]
    return [(r["event"], r["actor"], r["sandbox"]) for r in recs]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_TENANT", raising=False)
    return tmp_path


def test_records_about_a_tenants_sandbox_go_to_its_chain(home: Path) -> None:
    owners = Owners({"tabc-web": "acme", "mine": None})
    route_sandboxes(owners.tenant_of)
    audit.record("sandbox.stopped", sandbox="tabc-web", reason="ttl")  # mvmd on its own
    audit.record("proc.exited", sandbox="mine")
    audit.record("daemon.started")
    with labelled("alice"):  # the owner's own client, labelled, touching the tenant's
        audit.record("fs.write", sandbox="tabc-web")
        audit.record("fs.write", sandbox="mine")
    with acting_for("acme", "t0123456789ab"):
        audit.record("cmd.exec", sandbox="tabc-web")
        audit.record("plan.admitted", sandbox="tabc-new")  # not a sandbox yet
    assert chain(home, "acme") == [
        ("sandbox.stopped", "mvmd", "tabc-web"),
        ("fs.write", "alice", "tabc-web"),
        ("cmd.exec", "t0123456789ab", "tabc-web"),
        ("plan.admitted", "t0123456789ab", "tabc-new"),
    ]
    assert chain(home, "default") == [
        ("proc.exited", "mvmd", "mine"),
        ("daemon.started", "mvmd", None),
        ("fs.write", "alice", "mine"),
    ]
    assert audit.verify(home / "audit" / "acme.jsonl").ok
    assert audit.verify(home / "audit" / "default.jsonl").ok


def test_a_gone_service_routes_nothing(home: Path) -> None:
    owners = Owners({"tdef-x": "other"})
    route_sandboxes(owners.tenant_of)
    assert sandbox_tenant("tdef-x") == "other"
    del owners
    assert sandbox_tenant("tdef-x") is None
    assert sandbox_tenant(None) is None


def test_actor_labels_are_checked() -> None:
    for bad in ("", "a b", "x" * 65, "../x", "a\nb"):
        with pytest.raises(AuditError), labelled(bad):
            pass
    with labelled("mcp:claude-code_1.0"):
        pass


def test_the_record_keeps_its_tenant_and_token(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    rec = SandboxRecord(
        id="v1",
        name="tabc-web",
        image="python",
        image_id="i1",
        state="running",  # type: ignore[arg-type]
        created=1.0,
        expires_at=2.0,
        tenant="acme",
        token_id="t0123456789ab",
    )
    db.insert(rec)
    got = db.get("tabc-web")
    assert got is not None and (got.tenant, got.token_id) == ("acme", "t0123456789ab")
    # A record written before the fields existed is the owner's.
    old = b'{"id":"v2","name":"old","image":"python","image_id":"i","state":"running",'
    old += b'"created":1.0,"expires_at":2.0}'
    assert decode_record(old, SandboxRecord).tenant is None


def test_new_records_take_the_acting_tenant() -> None:
    from mvm.service.core import new_record

    fields = {"image": "python"}
    plain = new_record(fields, vm_id="v", name="n", image_id="i", ttl_seconds=60)
    assert (plain.tenant, plain.token_id) == (None, None)
    name = tenancy.to_service("acme", "n")
    with acting_for("acme", "t0123456789ab"):
        rec = new_record(fields, vm_id="v", name=name, image_id="i", ttl_seconds=60)
    assert (rec.tenant, rec.token_id) == ("acme", "t0123456789ab")


def test_mvmds_own_observations_name_mvmd_inside_a_request(home: Path) -> None:
    """A task that inherited a request's context (the agent reader of a sandbox created
    by that request) records a guest's exit as mvmd's, in the sandbox tenant's chain."""
    from mvm.audit.log import on_own, own_context

    owners = Owners({"tabc-web": "acme"})
    route_sandboxes(owners.tenant_of)
    with acting_for("acme", "t0123456789ab"):
        with on_own():
            audit.record("proc.exited", sandbox="tabc-web")
        own_context().run(audit.record, "egress.allowed", sandbox="tabc-web")
        audit.record("proc.started", sandbox="tabc-web")
    assert chain(home, "acme") == [
        ("proc.exited", "mvmd", "tabc-web"),
        ("egress.allowed", "mvmd", "tabc-web"),
        ("proc.started", "t0123456789ab", "tabc-web"),
    ]
