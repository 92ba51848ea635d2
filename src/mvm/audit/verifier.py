"""Check a whole audit log: signatures, the prev-hash chain, sequence numbers.

Pure over (lines, public key): the file is read by the caller. The report names
the first bad record (line, seq, id) and why, so an edited, removed, reordered or
truncated record is pinpointed, not just "invalid".

A log cut short at the end (newest records dropped whole) still verifies: the
report's ``head`` (last seq + hash) is what to compare against a receipt or a copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mvm.audit import keys
from mvm.audit.encoding import GENESIS, AuditError, canonical, record_hash, sha256_hex, signed_body
from mvm.audit.log import parse_line

#: At most this many problems are listed (the first is what matters).
MAX_PROBLEMS = 100

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "seq": int,
    "id": str,
    "time": str,
    "actor": str,
    "event": str,
    "data": dict,
    "prev": str,
    "sig": str,
}

# Reasons (stable strings, for programs).
UNPARSABLE = "unparsable line"
TRUNCATED = "truncated last line"
MALFORMED = "malformed record"
BAD_SIGNATURE = "bad signature"
WRONG_KEY = "signed by another key"
BAD_ID = "id does not match the record"
BROKEN_LINK = "broken prev-hash link"
SEQ_GAP = "sequence gap"
REORDERED = "reordered"
DUPLICATE = "duplicate sequence number"


@dataclass
class Problem:
    line: int
    reason: str
    detail: str
    seq: int | None = None
    id: str | None = None


@dataclass
class Report:
    ok: bool
    records: int
    head_seq: int | None
    head_hash: str | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["first_bad"] = asdict(self.first_bad) if self.first_bad else None
        return d


def verify_lines(lines: Iterable[bytes], pub: Ed25519PublicKey) -> Report:
    """Verify raw lines (each may or may not end in ``\\n``) in file order."""
    raw = list(lines)
    parsed = [parse_line(line) for line in raw]
    seqs_later: dict[int, int] = {}
    for i, rec in enumerate(parsed):
        s = rec.get("seq") if rec else None
        if isinstance(s, int):
            seqs_later.setdefault(s, i)
    kid = keys.fingerprint(pub)[:16]
    problems: list[Problem] = []
    seen: set[int] = set()
    expected_seq = 1
    prev_hash = GENESIS
    count = 0
    head_seq: int | None = None

    def add(p: Problem) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(p)

    for i, (line, rec) in enumerate(zip(raw, parsed, strict=True)):
        n = i + 1
        this_hash = record_hash(line)
        if rec is None:
            last = i == len(raw) - 1
            if last and not line.endswith(b"\n"):
                add(Problem(n, TRUNCATED, "the last line is incomplete (an interrupted write?)"))
            else:
                add(Problem(n, UNPARSABLE, "not a JSON object"))
            prev_hash = this_hash
            expected_seq += 1
            continue
        count += 1
        seq = rec.get("seq")
        rid = rec.get("id") if isinstance(rec.get("id"), str) else None
        bad_field = next(
            (
                k
                for k, t in _REQUIRED.items()
                if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)
            ),
            None,
        )
        if bad_field is not None or not isinstance(seq, int):
            add(
                Problem(
                    n,
                    MALFORMED,
                    f"field {bad_field!r} is missing or has the wrong type",
                    seq if isinstance(seq, int) else None,
                    rid,
                )
            )
            prev_hash = this_hash
            expected_seq += 1
            continue
        if rec.get("key") not in (None, kid):
            add(
                Problem(n, WRONG_KEY, f"key {rec.get('key')!r} is not the host key {kid}", seq, rid)
            )
        elif not keys.check(pub, signed_body(rec), rec["sig"]):
            add(Problem(n, BAD_SIGNATURE, "the record was edited after it was signed", seq, rid))
        elif rid != f"{seq}-{_id_hash(rec)}":
            add(Problem(n, BAD_ID, "the id is not derived from this record", seq, rid))
        if seq != expected_seq:
            if seq in seen:
                add(Problem(n, DUPLICATE, f"seq {seq} appeared before", seq, rid))
            elif seq > expected_seq and seqs_later.get(expected_seq, -1) > i:
                add(
                    Problem(
                        n,
                        REORDERED,
                        f"expected seq {expected_seq} here; it comes later in the file",
                        seq,
                        rid,
                    )
                )
            elif seq > expected_seq:
                missing = (
                    f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
                )
                add(Problem(n, SEQ_GAP, f"record(s) {missing} are missing (removed?)", seq, rid))
            else:
                add(Problem(n, REORDERED, f"seq {seq} comes after {expected_seq - 1}", seq, rid))
        elif rec["prev"] != prev_hash:
            add(
                Problem(
                    n,
                    BROKEN_LINK,
                    "prev does not match the hash of the line before (edited or replaced?)",
                    seq,
                    rid,
                )
            )
        seen.add(seq)
        expected_seq = seq + 1
        prev_hash = this_hash
        head_seq = seq
    return Report(
        ok=not problems,
        records=count,
        head_seq=head_seq,
        head_hash=prev_hash if raw else None,
        problems=problems,
    )


def _id_hash(rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k not in ("id", "sig")}
    return sha256_hex(canonical(body))[:12]


def verify_file(path: Path, pub: Ed25519PublicKey | None = None) -> Report:
    """Verify the log at ``path`` against ``pub`` (default: the host key next to it)."""
    if not path.exists():
        raise AuditError(f"no audit log at {path}", hint="nothing was audited yet", path=str(path))
    if pub is None:
        pub = keys.load_public(path.parent)
    with open(path, "rb") as f:
        return verify_lines(f, pub)
