"""API tokens for `mvmctl serve`: who may call mvm over TCP, for which tenant, until when.

A token is ``mvm_<id>_<secret>``. Only the SHA-256 of the whole token is stored (one
0600 JSON file per token under ``$MVM_HOME/tokens/``), so a leaked store grants
nothing; the plain token is shown once, at creation. Verification looks the record
up by its id and compares hashes in constant time, then checks revocation and expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Final

import msgspec

from mvm import names, paths
from mvm.errors import InvalidArgument

PREFIX: Final = "mvm_"
#: What a token may do: the native API, the E2B face; ``admin`` is required to speak for
#: the owner's tenant ``default`` (which sees every sandbox).
SCOPES: Final = ("sandboxes", "e2b", "admin")
DEFAULT_SCOPES: Final = ("sandboxes", "e2b")
#: The owner's own tenant (no name prefix: sees everything); see mvm.tenancy.
LOCAL_TENANT: Final = "default"
#: Longest token text accepted from a caller (anything longer is refused unread).
MAX_TOKEN_LEN: Final = 200


class TokenRecord(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    sha256: str
    created: float
    expires_at: float | None = None
    scopes: list[str] = []
    revoked: float | None = None

    def active(self, now: float | None = None) -> bool:
        t = time.time() if now is None else now
        return self.revoked is None and (self.expires_at is None or t < self.expires_at)


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who a verified token speaks for."""

    token_id: str
    tenant: str
    scopes: tuple[str, ...]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise InvalidArgument(f"unknown scope {bad[0]!r}", hint=f"use one of {', '.join(SCOPES)}")
    return sorted(set(scopes))


class TokenStore:
    """The token records of one ``$MVM_HOME``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else paths.home() / "tokens"

    def _path(self, token_id: str) -> Path:
        return self.root / f"{names.check('token', token_id)}.json"

    def create(
        self, tenant: str, *, ttl: float | None = None, scopes: list[str] | None = None
    ) -> tuple[str, TokenRecord]:
        """A new token for ``tenant``: returns the plain token (show it once) and its record."""
        names.check("tenant", tenant)
        if ttl is not None and not ttl > 0:
            raise InvalidArgument("token ttl must be positive")
        scope_list = check_scopes(list(scopes) if scopes else list(DEFAULT_SCOPES))
        if tenant == LOCAL_TENANT and "admin" not in scope_list:
            raise InvalidArgument(
                f"tenant {LOCAL_TENANT!r} is the host's owner (it sees every sandbox)",
                hint="pick another tenant name, or pass --scope admin deliberately",
            )
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        token_id = "t" + secrets.token_hex(6)
        plain = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        rec = TokenRecord(
            id=token_id,
            tenant=tenant,
            sha256=_hash(plain),
            created=now,
            expires_at=now + ttl if ttl is not None else None,
            scopes=scope_list,
        )
        self._write(rec, exclusive=True)
        return plain, rec

    def _write(self, rec: TokenRecord, *, exclusive: bool = False) -> None:
        path = self._path(rec.id)
        tmp = path.with_suffix(".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(rec))
            f.flush()
            os.fsync(f.fileno())
        if exclusive and path.exists():
            tmp.unlink()
            raise InvalidArgument(f"token {rec.id} exists")
        os.replace(tmp, path)

    def get(self, token_id: str) -> TokenRecord | None:
        try:
            raw = self._path(token_id).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(raw, type=TokenRecord)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def list(self) -> list[TokenRecord]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob("*.json")):
            if names.is_valid("token", p.stem):
                rec = self.get(p.stem)
                if rec is not None:
                    out.append(rec)
        return sorted(out, key=lambda r: r.created)

    def revoke(self, token_id: str) -> TokenRecord:
        rec = self.get(token_id)
        if rec is None:
            raise InvalidArgument(f"no token {token_id}", hint="see `mvmctl token ls`")
        if rec.revoked is None:
            rec.revoked = time.time()
            self._write(rec)
        return rec

    def verify(self, token: str | None) -> Identity | None:
        """The identity behind ``token``, or None (unknown, malformed, revoked or expired).

        Callers answer every None the same way (401, no detail)."""
        if not token or len(token) > MAX_TOKEN_LEN or not token.startswith(PREFIX):
            return None
        token_id, sep, _ = token[len(PREFIX) :].partition("_")
        if not sep or not names.is_valid("token", token_id):
            return None
        rec = self.get(token_id)
        if rec is None:
            # Same work as a real comparison, so timing does not tell ids apart.
            hmac.compare_digest(_hash(token), _hash(""))
            return None
        if not hmac.compare_digest(_hash(token), rec.sha256) or not rec.active():
            return None
        return Identity(token_id=rec.id, tenant=rec.tenant, scopes=tuple(rec.scopes))
