"""Canonical bytes of audit records: what is hashed and signed.

Pure. The encoding is JSON with sorted keys, no whitespace and UTF-8, so the same
record always gives the same bytes in every process and every Python version.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from mvm.errors import AuditError as AuditError  # defined in errors.py; re-exported here

#: The ``prev`` of the first record of a log.
GENESIS = "0" * 64

#: A record larger than this is refused: fields are metadata, never payloads.
MAX_RECORD_BYTES = 64 * 1024

#: Deepest nesting of lists/dicts accepted in fields.
MAX_DEPTH = 8


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256: how payloads appear in the audit log (never the bytes themselves)."""
    return hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes of ``obj`` (sorted keys, compact, UTF-8, no NaN)."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise AuditError(
            f"audit record is not JSON-able: {e}",
            hint="pass only names, hashes, sizes and counts (str/int/float/bool/None, lists, dicts)",
        ) from e


def check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate caller metadata: JSON scalars, lists and dicts with str keys, bounded depth.

    Bytes are refused outright: a payload must be passed as ``sha256_hex`` + size.
    """

    def walk(v: Any, depth: int, where: str) -> Any:
        if depth > MAX_DEPTH:
            raise AuditError(f"audit field {where} nests too deep", hint="flatten it")
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                raise AuditError(f"audit field {where} is not finite", hint="pass a number")
            return v
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1, f"{where}[]") for x in v]
        if isinstance(v, dict):
            out: dict[str, Any] = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise AuditError(
                        f"audit field {where} has a non-string key", hint="use str keys"
                    )
                out[k] = walk(x, depth + 1, f"{where}.{k}")
            return out
        raise AuditError(
            f"audit field {where} has type {type(v).__name__}",
            hint="payload bytes never go into the audit log: pass sha256_hex(data) and len(data)",
            field=where,
        )

    return {k: walk(v, 1, k) for k, v in fields.items()}


def argv_sha256(argv: list[str]) -> str:
    """Hash of a command line: SHA-256 of its canonical JSON list (unambiguous, unlike a join)."""
    return sha256_hex(canonical(list(argv)))


def record_hash(line: bytes) -> str:
    """The hash a successor's ``prev`` must carry: SHA-256 of the stored line (no newline)."""
    return sha256_hex(line.rstrip(b"\n"))


def signed_body(rec: dict[str, Any]) -> bytes:
    """What the signature covers: the canonical record without its ``sig``."""
    return canonical({k: v for k, v in rec.items() if k != "sig"})
