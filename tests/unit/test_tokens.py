"""Tokens: shown once, stored only as hashes (0600), expiring, revocable, scoped."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from mvm.errors import InvalidArgument
from mvm.tokens import TokenStore


def test_token_verifies_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens")
    plain, rec = store.create("acme")
    ident = store.verify(plain)
    assert ident is not None and ident.tenant == "acme" and ident.token_id == rec.id
    assert set(ident.scopes) == {"sandboxes", "e2b"}
    files = list((tmp_path / "tokens").iterdir())
    assert [f.name for f in files] == [f"{rec.id}.json"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o700
    secret = plain.rsplit("_", 1)[-1]
    assert secret not in files[0].read_text()


@pytest.mark.parametrize(
    "bad",
    ["", "mvm_", "Bearer x", "mvm_tzzz_abc", "mvm_../x_abc", "x" * 500, "mvm_t1_" + "a" * 300],
)
def test_malformed_or_unknown_tokens_fail(tmp_path: Path, bad: str) -> None:
    store = TokenStore(tmp_path)
    store.create("acme")
    assert store.verify(bad) is None


def test_a_changed_secret_fails(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    plain, _ = store.create("acme")
    assert store.verify(plain[:-1] + ("A" if plain[-1] != "A" else "B")) is None


def test_revoked_and_expired_tokens_fail(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    plain, rec = store.create("acme")
    store.revoke(rec.id)
    assert store.verify(plain) is None
    assert store.list()[0].revoked is not None
    short, rec2 = store.create("acme", ttl=0.05)
    assert store.verify(short) is not None
    deadline = time.monotonic() + 30  # a generous bound (loaded host), not a threshold
    while store.verify(short) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.verify(short) is None
    assert not store.get(rec2.id).active()  # type: ignore[union-attr]


def test_scopes_and_names_are_checked(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    with pytest.raises(InvalidArgument):
        store.create("acme", scopes=["root"])
    with pytest.raises(InvalidArgument):
        store.create("../etc")
    with pytest.raises(InvalidArgument):
        store.revoke("../x")
    with pytest.raises(InvalidArgument):
        store.create("default")  # the owner's tenant needs --scope admin
    assert store.create("default", scopes=["admin", "sandboxes"])[1].tenant == "default"
    plain, _ = store.create("acme", scopes=["e2b"])
    ident = store.verify(plain)
    assert ident is not None and ident.scopes == ("e2b",)
