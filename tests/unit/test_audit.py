"""The audit log: chain, signatures, verification of tampered copies, concurrency, receipts."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm import audit
from mvm.audit import keys, receipt
from mvm.audit import verifier as verify
from mvm.audit.encoding import GENESIS, canonical, record_hash
from mvm.audit.log import AuditLog


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    monkeypatch.delenv("MVM_TENANT", raising=False)
    return tmp_path


def write_some(n: int) -> list[str]:
    return [
        audit.record("cmd.exec.finished", sandbox="s1", exit_code=i, stdout_sha256="ab" * 32)
        for i in range(n)
    ]


def lines_of(home: Path, tenant: str = "default") -> list[bytes]:
    return (home / "audit" / f"{tenant}.jsonl").read_bytes().splitlines(keepends=True)


def check(lines: list[bytes], home: Path) -> verify.Report:
    return verify.verify_lines(lines, keys.load_public(home / "audit"))


def test_record_chains_and_verifies(home: Path) -> None:
    ids = write_some(5)
    recs = [json.loads(line) for line in lines_of(home)]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["id"] for r in recs] == ids
    assert recs[0]["prev"] == GENESIS
    for a, b, line in zip(recs, recs[1:], lines_of(home), strict=False):
        assert b["prev"] == record_hash(line)
        assert a["tenant"] == "default" and a["actor"] == "mvmd"
    rep = audit.verify()
    assert rep.ok and rep.records == 5 and rep.head_seq == 5


def test_key_is_private_and_public_key_is_published(home: Path) -> None:
    write_some(1)
    mode = stat.S_IMODE((home / "audit" / "host.key").stat().st_mode)
    assert mode == 0o600
    pub = keys.load_public(home / "audit")
    assert keys.fingerprint(pub)[:16] == json.loads(lines_of(home)[0])["key"]


def test_tenant_selects_the_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_TENANT", "team-a")
    audit.record("sandbox.launched", sandbox="x")
    assert (home / "audit" / "team-a.jsonl").is_file()
    assert json.loads(lines_of(home, "team-a")[0])["tenant"] == "team-a"
    monkeypatch.setenv("MVM_TENANT", "../evil")
    with pytest.raises(audit.AuditError):
        audit.record("sandbox.launched")


@pytest.mark.parametrize(
    "fields",
    [{"data": b"payload"}, {"x": float("nan")}, {"x": {1: 2}}, {"x": object()}],
)
def test_non_metadata_fields_are_refused(home: Path, fields: dict[str, object]) -> None:
    with pytest.raises(audit.AuditError):
        audit.record("fs.write", **fields)
    assert not (home / "audit" / "default.jsonl").exists()  # refused before anything is written


def test_oversized_record_and_bad_event_names_are_refused(home: Path) -> None:
    with pytest.raises(audit.AuditError):
        audit.record("fs.write", path="x" * 70000)
    with pytest.raises(audit.AuditError):
        audit.record("Not An Event")
    write_some(1)
    assert audit.verify().ok


def test_edited_record_is_named(home: Path) -> None:
    write_some(5)
    lines = lines_of(home)
    lines[2] = lines[2].replace(b'"exit_code":2', b'"exit_code":0')
    rep = check(lines, home)
    assert not rep.ok
    bad = rep.first_bad
    assert bad is not None
    assert (bad.line, bad.seq, bad.reason) == (3, 3, verify.BAD_SIGNATURE)


def test_removed_record_is_named(home: Path) -> None:
    write_some(5)
    lines = lines_of(home)
    del lines[1]
    bad = check(lines, home).first_bad
    assert bad is not None
    assert (bad.line, bad.seq, bad.reason) == (2, 3, verify.SEQ_GAP)
    assert "2" in bad.detail


def test_swapped_records_are_named(home: Path) -> None:
    write_some(5)
    lines = lines_of(home)
    lines[1], lines[2] = lines[2], lines[1]
    bad = check(lines, home).first_bad
    assert bad is not None
    assert (bad.line, bad.seq, bad.reason) == (2, 3, verify.REORDERED)


def test_replaced_record_breaks_the_link(home: Path, tmp_path: Path) -> None:
    """A record validly signed but from another chain position/log: the prev link catches it."""
    write_some(3)
    lines = lines_of(home)
    other = AuditLog(home / "audit" / "other.jsonl")
    for i in range(2):
        other.append("cmd.exec.finished", sandbox="s1", exit_code=i + 10)
    lines[1] = (home / "audit" / "other.jsonl").read_bytes().splitlines(keepends=True)[1]
    bad = check(lines, home).first_bad
    assert bad is not None
    assert (bad.line, bad.reason) == (2, verify.BROKEN_LINK)


def test_truncated_last_line_is_reported_and_appends_continue(home: Path) -> None:
    write_some(3)
    path = home / "audit" / "default.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # a torn final write
    bad = audit.verify().first_bad
    assert bad is not None and (bad.line, bad.reason) == (3, verify.TRUNCATED)
    write_some(1)
    rep = audit.verify()
    assert rep.first_bad is not None and rep.first_bad.reason == verify.UNPARSABLE
    assert len(rep.problems) == 1  # the new record chains onto the damaged line
    assert rep.head_seq == 4


def test_other_key_is_detected(home: Path) -> None:
    write_some(2)
    rep = verify.verify_lines(lines_of(home), Ed25519PrivateKey.generate().public_key())
    assert rep.first_bad is not None and rep.first_bad.reason == verify.WRONG_KEY


def _append_many(home: str, n: int) -> None:
    os.environ["MVM_HOME"] = home
    for i in range(n):
        audit.record("cmd.exec.started", actor=f"p{os.getpid()}", n=i)


def test_threads_and_processes_append_one_chain(home: Path) -> None:
    audit.record("sandbox.launched")  # key exists before the race (creation is raced below too)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(home), 40)) for _ in range(3)]
    threads = [threading.Thread(target=_append_many, args=(str(home), 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rep = audit.verify()
    assert rep.ok, rep.problems[:3]
    assert rep.records == 1 + 6 * 40


def test_key_creation_race_yields_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), 3)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    path = tmp_path / "audit" / "default.jsonl"
    rep = verify.verify_file(path)
    assert rep.ok and rep.records == 12


def test_tail_show_follow(home: Path) -> None:
    ids = write_some(4)
    log = audit.default_log()
    assert [r["id"] for r in log.tail(2)] == ids[2:]
    rec = log.find(ids[1])
    assert rec is not None and rec["seq"] == 2
    assert log.find("3") is not None and log.find("nope") is None
    follower = log.follow(poll_s=0.01)
    new = audit.record("sandbox.paused", sandbox="s1")
    assert next(follower)["id"] == new


def test_receipt_sign_verify_and_tamper(home: Path) -> None:
    hk = keys.load_or_create(home / "audit")
    body = receipt.build(
        argv_sha256=audit.argv_sha256(["echo", "hi"]),
        argc=2,
        env_keys=["B", "A"],
        image={"name": "python", "id": "x"},
        policy={"network": "none"},
        exit_code=0,
        outputs={"stdout": {"sha256": audit.sha256_hex(b"hi\n"), "bytes": 3}},
        timings={"duration": 0.5},
        audit_id="3-abc",
        tenant="default",
    )
    assert body["env_keys"] == ["A", "B"]
    signed = receipt.sign(body, hk)
    assert receipt.verify(signed, hk.public).ok
    path = home / "r.json"
    receipt.write(path, signed)
    assert receipt.verify(receipt.load(path), hk.public).ok
    for change in ({"exit_code": 1}, {"env_keys": ["A"]}, {"signature": signed["signature"][::-1]}):
        assert not receipt.verify({**signed, **change}, hk.public).ok
    stripped = {k: v for k, v in signed.items() if k != "signature"}
    assert not receipt.verify(stripped, hk.public).ok
    other = Ed25519PrivateKey.generate()
    forged = receipt.sign(
        body, keys.HostKey(other, other.public_key(), keys.fingerprint(other.public_key()))
    )
    res = receipt.verify(forged, hk.public)
    assert not res.ok and "another key" in res.reason
    assert not receipt.verify([1, 2], hk.public).ok


def test_receipt_load_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_bytes(b"\xff not json")
    with pytest.raises(audit.AuditError):
        receipt.load(p)
    p.write_bytes(b" " * (receipt.MAX_RECEIPT_BYTES + 10))
    with pytest.raises(audit.AuditError):
        receipt.load(p)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_canonical_is_stable_under_reparse(v: object) -> None:
    once = canonical(v)
    assert canonical(json.loads(once)) == once


_pub = Ed25519PrivateKey.generate().public_key()


@settings(max_examples=200)
@given(
    st.lists(
        st.binary(max_size=200) | st.builds(lambda d: canonical(d) + b"\n", json_values), max_size=8
    )
)
def test_verify_never_crashes_on_garbage(lines: list[bytes]) -> None:
    rep = verify.verify_lines(lines, _pub)
    assert rep.ok == (not rep.problems)
    if lines:
        assert not rep.ok  # nothing here is signed by _pub
