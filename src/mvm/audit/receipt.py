"""Signed receipts of one-shot runs: what ran, where, and what came out — as hashes.

A receipt is a JSON object; ``signature`` is Ed25519 by the host audit key over
the canonical encoding of everything else, and ``key`` is that key's full
fingerprint. ``verify`` checks it against the host key (``host.pub``), not
against a key the receipt itself carries, so a forger cannot bring their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mvm.audit import keys, signed
from mvm.audit.encoding import AuditError, check_fields

KIND = "mvm.receipt/1"
#: A receipt file larger than this is refused unread.
MAX_RECEIPT_BYTES = 256 * 1024


def build(
    *,
    argv_sha256: str,
    argc: int,
    env_keys: list[str],
    image: dict[str, Any],
    policy: dict[str, Any],
    exit_code: int,
    outputs: dict[str, dict[str, Any]],
    timings: dict[str, Any],
    audit_id: str | None,
    tenant: str,
    sandbox_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The unsigned receipt body (pure). Values are hashes, sizes, names and numbers."""
    body: dict[str, Any] = {
        "kind": KIND,
        "argv": {"sha256": argv_sha256, "count": argc},
        "env_keys": sorted(env_keys),
        "image": image,
        "policy": policy,
        "exit_code": exit_code,
        "outputs": outputs,
        "timings": timings,
        "audit_id": audit_id,
        "tenant": tenant,
        "sandbox_id": sandbox_id,
        **(extra or {}),
    }
    return check_fields(body)


def sign(body: dict[str, Any], hk: keys.HostKey) -> dict[str, Any]:
    """The receipt with ``key`` and ``signature`` (see ``signed``)."""
    return signed.sign(body, hk)


@dataclass
class ReceiptCheck:
    ok: bool
    reason: str
    key: str | None = None
    audit_id: str | None = None
    exit_code: int | None = None


def verify(receipt: object, pub: Ed25519PublicKey) -> ReceiptCheck:
    """Check kind, key fingerprint and signature (pure)."""
    if not isinstance(receipt, dict):
        return ReceiptCheck(False, "not a JSON object")
    if receipt.get("kind") != KIND:
        return ReceiptCheck(False, f"kind is {receipt.get('kind')!r}, not {KIND!r}")
    fp = keys.fingerprint(pub)
    key = receipt.get("key")
    aid = receipt.get("audit_id") if isinstance(receipt.get("audit_id"), str) else None
    code = receipt.get("exit_code") if isinstance(receipt.get("exit_code"), int) else None
    if key != fp:
        return ReceiptCheck(
            False,
            "signed by another key than this host's audit key",
            key if isinstance(key, str) else None,
            aid,
            code,
        )
    try:
        valid = signed.signature_ok(receipt, pub)
    except AuditError:
        return ReceiptCheck(False, "not canonical JSON", fp, aid, code)
    if not valid:
        return ReceiptCheck(
            False, "bad signature: the receipt was changed after signing", fp, aid, code
        )
    return ReceiptCheck(True, "signature valid", fp, aid, code)


#: Atomic write (temp + rename) of a receipt file (``signed.write``).
write = signed.write


def load(path: Path) -> object:
    """Parse a receipt file (bounded); raises AuditError when it is not JSON."""
    return signed.load(path, MAX_RECEIPT_BYTES, "an mvm receipt", "this is not an mvm receipt")
