"""Signed JSON documents kept apart from the log (checkpoints, receipts): one signing rule,
one signature check, one atomic write and one bounded read, so the two kinds cannot drift.

The signature is Ed25519 by the host audit key over the canonical encoding of every field
but ``signature``; ``key`` is that key's full fingerprint. Checks take the host's public
key from the caller, never a key the document carries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mvm.audit import keys
from mvm.audit.encoding import AuditError, canonical


def signed_bytes(doc: dict[str, Any]) -> bytes:
    """What the signature covers: the canonical encoding of every field but itself."""
    return canonical({k: v for k, v in doc.items() if k != "signature"})


def sign(body: dict[str, Any], hk: keys.HostKey) -> dict[str, Any]:
    """``body`` with ``key`` (the host key's fingerprint) and its ``signature``."""
    out = {k: v for k, v in body.items() if k not in ("key", "signature")}
    out["key"] = hk.fingerprint
    out["signature"] = keys.sign(hk.private, signed_bytes(out))
    return out


def signature_ok(doc: dict[str, Any], pub: Ed25519PublicKey) -> bool:
    """True when ``doc["signature"]`` signs the rest of ``doc`` with ``pub``."""
    return keys.check(pub, signed_bytes(doc), doc.get("signature"))


def write(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (temp + rename) so a reader never sees half a document; 0644 by
    the umask: it holds hashes and names, no secret."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load(path: Path, max_bytes: int, not_this: str, not_json_hint: str) -> object:
    """Parse a document file, reading at most ``max_bytes`` (AuditError when it is larger,
    unreadable or not JSON). ``not_this`` ends the hint for an oversized file."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise AuditError(
            f"cannot read {path}: {e.strerror}", hint="check the path", path=str(path)
        ) from e
    if len(data) > max_bytes:
        raise AuditError(
            f"{path} is larger than {max_bytes} bytes",
            hint=f"this is not {not_this}",
            path=str(path),
        )
    try:
        return json.loads(data)
    except ValueError as e:
        raise AuditError(f"{path} is not JSON: {e}", hint=not_json_hint, path=str(path)) from e
