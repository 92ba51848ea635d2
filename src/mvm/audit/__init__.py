"""Audit: an append-only, hash-chained, Ed25519-signed JSONL log per tenant.

Callers record *metadata* only — names, hashes (``sha256_hex``), sizes, counts,
exit codes. Payload bytes (file contents, output, env values) never go in.

    from mvm import audit
    audit_id = audit.record("fs.write", sandbox="web", path="/work/a", size=3,
                            sha256=audit.sha256_hex(b"abc"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvm.audit.encoding import AuditError, argv_sha256, sha256_hex
from mvm.audit.log import AuditLog, audit_dir, default_log, default_path, tenant
from mvm.audit.verifier import Report, verify_file

__all__ = [
    "AuditError",
    "AuditLog",
    "Report",
    "argv_sha256",
    "audit_dir",
    "default_log",
    "default_path",
    "record",
    "sha256_hex",
    "tenant",
    "verify",
    "verify_file",
]


def record(event: str, *, actor: str = "mvmd", sandbox: str | None = None, **fields: Any) -> str:
    """Append one signed, chained record to the default log (that of the tenant owning
    ``sandbox``, when a sandbox service knows it); return its audit id.

    ``fields`` must be JSON-able metadata (str/int/float/bool/None, lists, dicts);
    bytes are refused. Raises ``AuditError`` if the log cannot be written.
    """
    return default_log(sandbox).append(event, actor=actor, sandbox=sandbox, **fields)


def verify(path: Path | None = None) -> Report:
    """Verify a log (default: this tenant's) against the host key; see ``Report.first_bad``."""
    return verify_file(path or default_path())
