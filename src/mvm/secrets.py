"""The secret store: named values, encrypted at rest, resolved by mvmd when a process starts.

Layout under ``$MVM_HOME/secrets/`` (0700): ``store.json`` (0600) holds, per name, an
AES-256-GCM ciphertext whose associated data is the name (a ciphertext moved to another
name fails to decrypt). The 32-byte key lives in the OS keyring when the ``keyring``
module is importable and its backend really stores and returns a value; otherwise in
``key`` (0600, refused if anyone else can read it). The store records where its key is,
so a store made with the keyring never silently gets a new file key.

Only names ever leave this module in listings, state, audit or errors; values leave only
through ``get``/``resolve`` for injection into the one process that asked.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import secrets as _random
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mvm import names, paths
from mvm.errors import SecretError, SecretNotFound

#: The one rule for secret names (``mvm.names``), kept here under its old name.
NAME_RE = names.MIXED_RE
#: Largest secret value (bytes of UTF-8).
MAX_VALUE = 64 * 1024
#: Shortest value: shorter ones would redact ordinary output and leak by elimination.
MIN_VALUE = 4
KEYRING_SERVICE = "mvm-secret-store"
#: Environment switch to keep the store off the OS keyring (``0``: always use the key file).
KEYRING_ENV = "MVM_SECRETS_KEYRING"


class Entry(msgspec.Struct, kw_only=True):
    nonce: str  # base64
    ct: str  # base64, AES-GCM ciphertext + tag
    created: float
    updated: float


class StoreFile(msgspec.Struct, kw_only=True):
    version: int = 1
    key: str = "file"  # "file" or "keyring"
    secrets: dict[str, Entry] = {}


def check_name(name: str) -> None:
    """The one name rule (``names.check("secret")``), raised as SecretError. (Before it
    was its own ``re.match`` with ``$``, which let a trailing newline through.)"""
    if not names.is_valid("secret", name):
        raise SecretError(
            f"invalid secret name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (max 64, starting with a letter or digit)",
        )


def check_value(name: str, value: str) -> None:
    size = len(value.encode("utf-8"))
    if size < MIN_VALUE:
        raise SecretError(
            f"secret {name} is too short ({size} bytes; at least {MIN_VALUE})",
            hint="short values would be redacted all over ordinary output",
            name=name,
        )
    if size > MAX_VALUE:
        raise SecretError(f"secret {name} is larger than {MAX_VALUE} bytes", name=name)
    if "\0" in value:
        raise SecretError(
            f"secret {name} contains a NUL byte", hint="environment values cannot", name=name
        )


def _keyring_module() -> Any | None:
    """The ``keyring`` module if it is importable, enabled and has a working backend."""
    if os.environ.get(KEYRING_ENV, "1") == "0":
        return None
    try:
        import keyring  # type: ignore[import-not-found,unused-ignore]
    except Exception:
        return None
    try:
        backend = keyring.get_keyring()
        if "fail" in type(backend).__module__ or getattr(backend, "priority", 1) <= 0:
            return None
    except Exception:
        return None
    return keyring


class SecretStore:
    """Named secrets under ``root`` (default ``$MVM_HOME/secrets``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else paths.home() / "secrets"
        self.path = self.root / "store.json"
        self.key_path = self.root / "key"

    # -- files ----------------------------------------------------------------------------
    def _ensure_dir(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.root.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SecretError(
                f"{self.root} is not a directory owned by you",
                hint="remove it",
                path=str(self.root),
            )
        if st.st_mode & 0o077:
            os.chmod(self.root, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_dir()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> StoreFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return StoreFile()
        except OSError as exc:
            raise SecretError(f"cannot read {self.path}: {exc}", path=str(self.path)) from None
        try:
            return msgspec.json.decode(raw, type=StoreFile)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SecretError(
                f"{self.path} is damaged: {exc}",
                hint="restore it from a backup, or remove it (all secrets are lost)",
                path=str(self.path),
            ) from None

    def _write(self, store: StoreFile) -> None:
        tmp = self.path.with_name(f".store.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, msgspec.json.encode(store))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    # -- the key --------------------------------------------------------------------------
    def _file_key(self, create: bool) -> bytes | None:
        try:
            fd = os.open(self.key_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                return None
            key = AESGCM.generate_key(bit_length=256)
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, base64.b64encode(key) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            return key
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise SecretError(
                    f"the secret key file {self.key_path} is readable by others or not yours",
                    hint=f"chmod 600 {self.key_path} (and rotate the secrets)",
                    path=str(self.key_path),
                )
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            key = base64.b64decode(data.strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise SecretError(f"the secret key file {self.key_path} is damaged")
        return key

    def _keyring_key(self, kr: Any, create: bool) -> bytes | None:
        account = str(self.root.resolve())
        try:
            stored = kr.get_password(KEYRING_SERVICE, account)
            if stored is None and create:
                new = base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()
                kr.set_password(KEYRING_SERVICE, account, new)
                stored = kr.get_password(KEYRING_SERVICE, account)
                if stored != new:
                    return None
        except Exception:
            return None
        if stored is None:
            return None
        key = base64.b64decode(stored)
        return key if len(key) == 32 else None

    def _key(self, store: StoreFile, create: bool) -> tuple[bytes, str] | None:
        """(key, where) for this store; a new store prefers a working keyring."""
        if store.secrets or self.key_path.exists() or store.key == "keyring":
            if store.key == "keyring":
                kr = _keyring_module()
                key = self._keyring_key(kr, create=False) if kr is not None else None
                if key is None:
                    raise SecretError(
                        "the secret store's key is in the OS keyring, which is not available now",
                        hint="unlock the keyring (or run where it is available)",
                    )
                return key, "keyring"
            fkey = self._file_key(create)
            return (fkey, "file") if fkey is not None else None
        if not create:
            return None
        kr = _keyring_module()
        if kr is not None:
            key = self._keyring_key(kr, create=True)
            if key is not None:
                return key, "keyring"
        fkey = self._file_key(create=True)
        assert fkey is not None
        return fkey, "file"

    # -- the API --------------------------------------------------------------------------
    def put(self, name: str, value: str) -> None:
        """Store (or replace) ``name``."""
        check_name(name)
        check_value(name, value)
        with self._locked():
            store = self._read()
            got = self._key(store, create=True)
            assert got is not None
            key, where = got
            store.key = where
            nonce = _random.token_bytes(12)
            ct = AESGCM(key).encrypt(nonce, value.encode("utf-8"), name.encode())
            now = time.time()
            old = store.secrets.get(name)
            store.secrets[name] = Entry(
                nonce=base64.b64encode(nonce).decode(),
                ct=base64.b64encode(ct).decode(),
                created=old.created if old else now,
                updated=now,
            )
            self._write(store)

    def names(self) -> list[str]:
        return sorted(self._read().secrets)

    def _not_found(self, name: str, known: list[str], env: str | None = None) -> SecretNotFound:
        where = f" (for ${env})" if env else ""
        return SecretNotFound(
            f"no secret named {name!r}{where}",
            hint=f"known secrets: {', '.join(known) or 'none'}; add it: mvmctl secret put {name}",
            name=name,
            known=",".join(known),
        )

    def get(self, name: str) -> str:
        check_name(name)
        store = self._read()
        entry = store.secrets.get(name)
        if entry is None:
            raise self._not_found(name, sorted(store.secrets))
        got = self._key(store, create=False)
        if got is None:
            raise SecretError(
                f"the key of the secret store is missing ({self.key_path})",
                hint="restore the key file; without it the secrets cannot be read",
            )
        try:
            plain = AESGCM(got[0]).decrypt(
                base64.b64decode(entry.nonce), base64.b64decode(entry.ct), name.encode()
            )
        except (InvalidTag, ValueError):
            raise SecretError(
                f"secret {name} does not decrypt with the store's key",
                hint=f"the store or key was changed; put it again: mvmctl secret put {name}",
                name=name,
            ) from None
        return plain.decode("utf-8")

    def remove(self, name: str) -> None:
        check_name(name)
        with self._locked():
            store = self._read()
            if name not in store.secrets:
                raise self._not_found(name, sorted(store.secrets))
            del store.secrets[name]
            self._write(store)

    def resolve(self, refs: Mapping[str, str]) -> dict[str, str]:
        """``{ENV: secret name}`` -> ``{ENV: value}``; an unknown name fails before anything."""
        known = self.names()
        for env, name in refs.items():
            check_name(name)
            if name not in known:
                raise self._not_found(name, known, env)
        return {env: self.get(name) for env, name in refs.items()}


def secret_ref(value: str) -> str | None:
    """The secret name in a ``secret:NAME`` env value, else None."""
    if value.startswith("secret:"):
        return value[len("secret:") :]
    return None


__all__ = ["SecretStore", "check_name", "secret_ref"]
