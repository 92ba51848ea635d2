"""Admission for the verbs after create (forward, set-ttl, exec, uploads) and the one
policy source with its reload rule. Pure except the policy file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mvm import errors
from mvm.api import models as M
from mvm.policy.admission import (
    Policy,
    PolicySource,
    admit_exec,
    admit_forward,
    admit_ttl,
    admit_uploads,
    denied_error,
)


def rules(d: object) -> list[str]:
    return [x.rule for x in d.denials]  # type: ignore[attr-defined]


def test_forward_rules_match_create() -> None:
    pol = Policy()
    assert rules(admit_forward(("127.0.0.1", 0, 80, False), 0, pol)) == []
    assert rules(admit_forward(("0.0.0.0", 0, 80, True), 0, pol)) == ["ports.wildcard"]
    wide = Policy(allow_wildcard_ports=True, max_ports=2)
    assert rules(admit_forward(("0.0.0.0", 0, 80, True), 1, wide)) == []
    assert rules(admit_forward(("127.0.0.1", 0, 80, False), 2, wide)) == ["ports.count"]


def test_ttl_uses_the_policy_max() -> None:
    assert rules(admit_ttl(3600, Policy(max_ttl_seconds=3600))) == []
    assert rules(admit_ttl(3601, Policy(max_ttl_seconds=3600))) == ["ttl"]
    assert rules(admit_ttl(float("nan"), Policy())) == ["ttl"]


def test_exec_secrets_and_root() -> None:
    pol = Policy(allowed_secrets=("api-*",), allow_root_exec=False)
    assert rules(admit_exec(["api-key"], None, pol)) == []
    assert rules(admit_exec(["other"], "user", pol)) == ["secrets"]
    assert rules(admit_exec([], "root", pol)) == ["exec.user"]
    assert rules(admit_exec([], "0", pol)) == ["exec.user"]
    assert rules(admit_exec([], "root", Policy())) == []
    err = denied_error(admit_exec(["other"], "root", pol), "exec")
    assert "policy denied exec" in err.message and err.data["rules"] == "secrets,exec.user"


def test_uploads_are_mounts_when_roots_are_set() -> None:
    assert admit_uploads(["/home/u/proj"], Policy()).allowed  # no roots: the caller's files
    pol = Policy(mount_roots=("/srv/data",))
    assert admit_uploads(["/srv/data/proj"], pol).allowed
    assert rules(admit_uploads(["/home/u/proj"], pol)) == ["mounts"]
    assert rules(admit_uploads(["/srv/data/../../etc"], pol)) == ["mounts"]


def test_one_source_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    src = PolicySource(f)
    with pytest.raises(errors.PolicyFileError):  # named explicitly: must exist
        src.current()
    f.write_text("max_ports = 3\n")
    assert src.current().max_ports == 3
    f.write_text("max_ports = 4\n")
    os.utime(f, ns=(1, 1))
    assert src.current().max_ports == 4
    first = src.current()
    assert src.current() is first  # unchanged: not parsed again


def test_default_source_without_a_file_is_the_default_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_POLICY", raising=False)
    src = PolicySource()
    assert src.current() == Policy()
    (tmp_path / "policy.toml").write_text("allow_root_exec = false\n")
    assert src.current().allow_root_exec is False


def test_exec_events_gather_into_one_result() -> None:
    seen: list[tuple[str, bytes]] = []
    events = [
        M.ExecEvent(type="stdout", data=b"a"),
        M.ExecEvent(type="stderr", data=b"b"),
        M.ExecEvent(type="stdout", data=b"c"),
        M.ExecEvent(type="exit", exit_code=3, duration=1.5, truncated_stdout=True, audit_id="1-x"),
    ]
    r = M.gather_exec(events, on_output=lambda s, d: seen.append((s, d)))
    assert (r.exit_code, r.stdout, r.stderr, r.truncated_stdout, r.audit_id) == (
        3, b"ac", b"b", True, "1-x",
    )  # fmt: skip
    assert seen == [("stdout", b"a"), ("stderr", b"b"), ("stdout", b"c")]
    assert M.gather_exec(events, keep=False).stdout == b""
    err = M.ExecEvent(type="error", error=M.ErrorBody(error="PolicyDenied", message="no"))
    with pytest.raises(errors.PolicyDenied):
        M.gather_exec([err])
    with pytest.raises(errors.MvmError, match="without an exit"):
        M.gather_exec(events[:1])


def test_a_command_too_large_for_the_agent_is_refused_naming_the_limit() -> None:
    from mvm.agent import protocol as P
    from mvm.service.execs import check_command

    check_command(["echo", "x" * 100_000], {"A": "b"}, "/work")  # travels in the payload
    with pytest.raises(errors.InvalidArgument) as info:
        check_command(["echo", "x" * (P.MAX_ARG + 1)], {}, None)
    assert str(P.MAX_ARG) in info.value.message
    with pytest.raises(errors.InvalidArgument) as info:
        check_command(["echo", *["x" * 100_000] * 6], {}, None)
    assert str(P.MAX_SPEC) in info.value.message
    with pytest.raises(errors.InvalidArgument, match="empty command"):
        check_command([], {}, None)
