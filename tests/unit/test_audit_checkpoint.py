"""Audit checkpoints: a signed head that detects dropped newest records and rewrites.

Each tampering case is done to a real log written by ``audit.record``; the checkpoint is
made and checked by the same code ``mvmctl audit checkpoint`` / ``verify --checkpoint`` run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm import audit
from mvm.audit import checkpoint as C
from mvm.audit import keys, signed
from mvm.audit import verifier as V
from mvm.audit.log import AuditLog
from mvm.cli import main as cli_main


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.setenv("MVM_AUDIT_FSYNC", "0")
    monkeypatch.delenv("MVM_TENANT", raising=False)
    return tmp_path


def write_some(n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        audit.record("cmd.exec.finished", sandbox="s1", exit_code=i)


def log_file(home: Path) -> Path:
    return home / "audit" / "default.jsonl"


def keep_lines(home: Path, n: int) -> None:
    """Drop every line after the first ``n`` (an attacker removing the newest records)."""
    path = log_file(home)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:n]))


def check(home: Path, cp: object) -> V.Report:
    return C.verify_file(log_file(home), cp)


def reasons(rep: V.Report) -> list[str]:
    return [p.reason for p in rep.problems]


def test_intact_log_reaches_its_checkpoint_and_may_grow(home: Path) -> None:
    write_some(5)
    cp = C.make(audit.default_log())
    assert (cp["kind"], cp["seq"], cp["records"], cp["tenant"]) == (C.KIND, 5, 5, "default")
    assert cp["hash"] == audit.verify().head_hash
    assert cp["key"] == keys.fingerprint(keys.load_public(home / "audit"))
    assert check(home, cp).ok
    write_some(3, 5)  # newer records after the checkpoint are the normal case
    rep = check(home, cp)
    assert rep.ok and rep.head_seq == 8


def test_dropped_newest_records_are_named(home: Path) -> None:
    write_some(6)
    cp = C.make(audit.default_log())
    keep_lines(home, 3)
    assert audit.verify().ok  # the shortened log still verifies on its own ...
    rep = check(home, cp)  # ... the checkpoint shows what is gone
    assert not rep.ok and reasons(rep) == [C.DROPPED]
    bad = rep.first_bad
    assert bad is not None and bad.seq == 4 and "4..6" in bad.detail


def test_one_dropped_record_is_named_alone(home: Path) -> None:
    write_some(6)
    cp = C.make(audit.default_log())
    keep_lines(home, 5)
    rep = check(home, cp)
    assert reasons(rep) == [C.DROPPED] and "record(s) 6 are missing" in rep.problems[0].detail


def test_an_emptied_log_is_named(home: Path) -> None:
    write_some(2)
    cp = C.make(audit.default_log())
    keep_lines(home, 0)
    rep = check(home, cp)
    assert reasons(rep) == [C.DROPPED] and "1..2" in rep.problems[0].detail


def test_rewritten_tail_with_the_host_key_is_detected(home: Path) -> None:
    """An attacker holding the key drops the newest records and writes new ones in their
    place: the log verifies on its own, but the record at the checkpoint's seq differs."""
    write_some(4)
    cp = C.make(audit.default_log())
    keep_lines(home, 2)
    audit.record("cmd.exec.finished", sandbox="s1", exit_code=99)
    audit.record("cmd.exec.finished", sandbox="s1", exit_code=98)
    assert audit.verify().ok and audit.verify().head_seq == 4
    rep = check(home, cp)
    assert reasons(rep) == [C.DIFFERS]
    assert rep.first_bad is not None and rep.first_bad.seq == 4 and rep.first_bad.line == 4


def test_edited_record_at_the_checkpoint(home: Path) -> None:
    write_some(3)
    cp = C.make(audit.default_log())
    path = log_file(home)
    lines = path.read_bytes().splitlines(keepends=True)
    rec = json.loads(lines[2])
    rec["data"]["exit_code"] = 42
    lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    rep = check(home, cp)
    assert reasons(rep) == [V.BAD_SIGNATURE, C.DIFFERS]
    assert [p.seq for p in rep.problems] == [3, 3]


def sign_with(cp: dict[str, Any], key: Ed25519PrivateKey, *, key_field: str) -> dict[str, Any]:
    out = {k: v for k, v in cp.items() if k != "signature"}
    out["key"] = key_field
    out["signature"] = keys.sign(key, signed.signed_bytes(out))
    return out


def test_checkpoint_signed_by_another_key_is_refused(home: Path) -> None:
    write_some(2)
    cp = C.make(audit.default_log())
    other = Ed25519PrivateKey.generate()
    forged = sign_with(cp, other, key_field=keys.fingerprint(other.public_key()))
    assert reasons(check(home, forged)) == [C.CP_WRONG_KEY]
    # Claiming the host key's fingerprint does not help: the signature does not match it.
    host_fp = keys.fingerprint(keys.load_public(home / "audit"))
    assert reasons(check(home, sign_with(cp, other, key_field=host_fp))) == [C.CP_BAD_SIGNATURE]
    # Verified against another public key, a genuine checkpoint proves nothing either.
    rep = C.verify_file(log_file(home), cp, other.public_key())
    assert C.CP_WRONG_KEY in reasons(rep)


def test_edited_checkpoint_is_refused(home: Path) -> None:
    write_some(3)
    cp = C.make(audit.default_log())
    assert reasons(check(home, {**cp, "seq": 2})) == [C.CP_BAD_SIGNATURE]
    assert reasons(check(home, {**cp, "hash": "0" * 64})) == [C.CP_BAD_SIGNATURE]


@pytest.mark.parametrize(
    "garbage",
    [None, [], "x", {"kind": "other"}, {"kind": C.KIND}, {"kind": C.KIND, "seq": True}],
)
def test_malformed_checkpoints_are_reported(home: Path, garbage: object) -> None:
    write_some(1)
    assert reasons(check(home, garbage)) == [C.CP_MALFORMED]


def test_make_refuses_an_empty_or_damaged_log(home: Path) -> None:
    with pytest.raises(audit.AuditError):
        C.make(audit.default_log())
    write_some(3)
    keep_lines(home, 3)
    path = log_file(home)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])  # seq 2 removed
    with pytest.raises(audit.AuditError) as exc:
        C.make(AuditLog(path))
    assert V.SEQ_GAP in exc.value.message


def test_cli_checkpoint_and_verify(home: Path, tmp_path: Path) -> None:
    write_some(4)
    cp_file = tmp_path / "head.json"

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli_main.cli, list(args), prog_name="mvmctl")

    r = invoke("audit", "checkpoint", "-o", str(cp_file))
    assert r.exit_code == 0, r.output
    assert "seq 4" in r.output and json.loads(cp_file.read_text())["seq"] == 4
    r = invoke("audit", "checkpoint")
    assert r.exit_code == 0 and json.loads(r.output)["seq"] == 4
    r = invoke("audit", "verify", "--checkpoint", str(cp_file))
    assert r.exit_code == 0 and "reaches the checkpoint" in r.output
    keep_lines(home, 2)
    r = invoke("audit", "verify")
    assert r.exit_code == 0  # alone, the shortened log looks fine
    r = invoke("audit", "verify", "--checkpoint", str(cp_file), "--json")
    assert r.exit_code == 1
    out = json.loads(r.output)
    assert out["first_bad"]["reason"] == C.DROPPED and "3..4" in out["first_bad"]["detail"]
