"""The host signing key: Ed25519, created on first use, private part 0600.

Creation is race-free across processes: the key is written to a temporary file
and hard-linked into place, so exactly one creator wins and everyone loads it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mvm.audit.encoding import AuditError

KEY_NAME = "host.key"
PUB_NAME = "host.pub"


def fingerprint(pub: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: how receipts and records name the key."""
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def pub_b64(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def pub_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as e:
        raise AuditError("not an Ed25519 public key", hint="pass the host.pub file") from e


def sign(key: Ed25519PrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body)).decode("ascii")


def check(pub: Ed25519PublicKey, body: bytes, sig: object) -> bool:
    """True when ``sig`` (base64 text) is a valid signature of ``body``."""
    if not isinstance(sig, str) or len(sig) > 200:
        return False
    try:
        pub.verify(base64.b64decode(sig, validate=True), body)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class HostKey:
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    fingerprint: str


_lock = threading.Lock()
_cache: dict[Path, HostKey] = {}


def load_or_create(audit_dir: Path) -> HostKey:
    """The key under ``audit_dir``; created (0600) with its ``host.pub`` when missing."""
    path = audit_dir / KEY_NAME
    with _lock:
        hk = _cache.get(path)
        if hk is not None:
            return hk
        audit_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            _create(audit_dir)
        try:
            data = path.read_bytes()
            priv = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError) as e:
            raise AuditError(
                f"cannot load the audit host key {path}: {e}",
                hint="restore it from a backup; a new key cannot verify old records",
                path=str(path),
            ) from e
        if not isinstance(priv, Ed25519PrivateKey):
            raise AuditError(f"{path} is not an Ed25519 key", hint="restore it", path=str(path))
        pub = priv.public_key()
        pubfile = audit_dir / PUB_NAME
        if not pubfile.exists():
            _write_atomic(pubfile, (pub_b64(pub) + "\n").encode(), 0o644)
        hk = HostKey(priv, pub, fingerprint(pub))
        _cache[path] = hk
        return hk


def load_public(audit_dir: Path) -> Ed25519PublicKey:
    """The host's public key (from ``host.pub``, or derived from ``host.key``)."""
    pubfile = audit_dir / PUB_NAME
    if pubfile.exists():
        return pub_from_b64(pubfile.read_text())
    if (audit_dir / KEY_NAME).exists():
        return load_or_create(audit_dir).public
    raise AuditError(
        f"no audit host key under {audit_dir}",
        hint="nothing was audited here yet, or pass --pubkey",
        path=str(audit_dir),
    )


def _create(audit_dir: Path) -> None:
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(audit_dir / KEY_NAME, pem, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a temp file and link it into place; losing a race to another creator is fine."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
