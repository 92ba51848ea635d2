"""Audit checkpoints: a signed head (seq, hash, time, key) kept away from the log.

A log verifies on its own even when its newest records were dropped whole (the chain
still links, only shorter). A checkpoint anchors the head: ``mvmctl audit checkpoint``
signs the current head with the host key, the operator stores the file elsewhere, and
``audit verify --checkpoint FILE`` then reports a log whose head is older than the
checkpoint (records dropped) or whose record at the checkpoint's seq hashes differently
(rewritten), naming the missing or different records.

The check (``compare``) is pure over (lines, report, checkpoint, public key).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mvm.audit import keys, signed
from mvm.audit.encoding import AuditError, record_hash
from mvm.audit.log import AuditLog, parse_line
from mvm.audit.verifier import Problem, Report, verify_lines

KIND = "mvm.audit.checkpoint/1"
#: A checkpoint file larger than this is refused unread.
MAX_CHECKPOINT_BYTES = 16 * 1024

# Reasons (stable strings, for programs).
CP_WRONG_KEY = "checkpoint signed by another key"
CP_BAD_SIGNATURE = "checkpoint signature invalid"
CP_MALFORMED = "malformed checkpoint"
DROPPED = "records missing after the log head"
DIFFERS = "record differs from the checkpoint"

_FIELDS: dict[str, type] = {"seq": int, "hash": str, "time": str, "key": str, "signature": str}


def make(log: AuditLog) -> dict[str, Any]:
    """The signed head of ``log`` (read under its append lock). Refuses an empty log and
    one that does not verify: anchoring a damaged log would bless the damage."""
    lines = log.locked_lines()
    hk = keys.load_or_create(log.dir)
    rep = verify_lines(lines, hk.public)
    if rep.head_seq is None or rep.head_hash is None:
        raise AuditError(
            f"the audit log {log.path} is empty: nothing to anchor",
            hint="take a checkpoint once something was audited",
            path=str(log.path),
        )
    if not rep.ok:
        bad = rep.first_bad
        assert bad is not None
        raise AuditError(
            f"the audit log does not verify (line {bad.line}: {bad.reason}); not anchoring it",
            hint="see `mvmctl audit verify`",
        )
    body: dict[str, Any] = {
        "kind": KIND,
        "tenant": log.tenant,
        "seq": rep.head_seq,
        "hash": rep.head_hash,
        "records": rep.records,
        "time": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    return signed.sign(body, hk)


def compare(
    lines: Sequence[bytes], report: Report, cp: object, pub: Ed25519PublicKey
) -> list[Problem]:
    """What the checkpoint ``cp`` proves about the log ``lines`` (already verified into
    ``report``): its own signature by ``pub``, then the head and the record at its seq."""
    end = len(lines) + 1  # where dropped records would have been
    if not isinstance(cp, dict) or cp.get("kind") != KIND:
        return [Problem(end, CP_MALFORMED, f"not an mvm audit checkpoint ({KIND})")]
    bad = next(
        (k for k, t in _FIELDS.items() if not isinstance(cp.get(k), t) or cp.get(k) is True),
        None,
    )
    if bad is not None or cp["seq"] < 1:
        return [Problem(end, CP_MALFORMED, f"field {bad or 'seq'!r} is missing or invalid")]
    fp = keys.fingerprint(pub)
    if cp["key"] != fp:
        return [
            Problem(
                end,
                CP_WRONG_KEY,
                f"key {str(cp['key'])[:16]} is not the host key {fp[:16]}: this checkpoint "
                "proves nothing about this log",
            )
        ]
    if not signed.signature_ok(cp, pub):
        return [Problem(end, CP_BAD_SIGNATURE, "the checkpoint was changed after it was signed")]
    seq, want = int(cp["seq"]), str(cp["hash"])
    head = report.head_seq or 0
    if head < seq:
        missing = f"{seq}" if head + 1 == seq else f"{head + 1}..{seq}"
        return [
            Problem(
                end,
                DROPPED,
                f"the log ends at seq {head or 'nothing'} but the checkpoint of {cp['time']} "
                f"was taken at seq {seq}: record(s) {missing} are missing (newest dropped?)",
                head + 1,
            )
        ]
    for n, line in enumerate(lines, 1):
        rec = parse_line(line)
        if rec is not None and rec.get("seq") == seq:
            if record_hash(line) != want:
                rid = rec.get("id") if isinstance(rec.get("id"), str) else None
                return [
                    Problem(
                        n,
                        DIFFERS,
                        f"seq {seq} hashes differently from the checkpoint of {cp['time']} "
                        "(the record, or the records up to it, were rewritten)",
                        seq,
                        rid,
                    )
                ]
            return []
    return [Problem(end, DIFFERS, f"no record with seq {seq} (the checkpoint's) is left", seq)]


def verify_file(path: Path, cp: object, pub: Ed25519PublicKey | None = None) -> Report:
    """Verify the log at ``path`` and check it against the checkpoint ``cp``."""
    if not path.exists():
        raise AuditError(f"no audit log at {path}", hint="nothing was audited yet", path=str(path))
    if pub is None:
        pub = keys.load_public(path.parent)
    with open(path, "rb") as f:
        lines = f.readlines()
    rep = verify_lines(lines, pub)
    rep.problems.extend(compare(lines, rep, cp, pub))
    rep.ok = not rep.problems
    return rep


#: Atomic write (temp + rename) of a checkpoint file (``signed.write``).
write = signed.write


def load(path: Path) -> object:
    """Parse a checkpoint file (bounded); raises AuditError when it is not JSON."""
    return signed.load(
        path, MAX_CHECKPOINT_BYTES, "an mvm audit checkpoint", "pass a checkpoint file"
    )
