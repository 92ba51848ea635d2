"""The secret store: encrypted at rest, 0600/0700, names validated, clear errors."""

from __future__ import annotations

import os
import secrets as random_source
import stat
from pathlib import Path

import pytest

from mvm.errors import SecretError, SecretNotFound
from mvm.secrets import SecretStore, secret_ref


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SecretStore:
    monkeypatch.setenv("MVM_SECRETS_KEYRING", "0")
    return SecretStore(tmp_path / "secrets")


def test_put_get_names_remove(store: SecretStore) -> None:
    store.put("api-key", "sk-live-123")
    store.put("db.pass", "correct horse")
    assert store.names() == ["api-key", "db.pass"]
    assert store.get("api-key") == "sk-live-123"
    store.put("api-key", "sk-live-456")  # replace
    assert store.get("api-key") == "sk-live-456"
    store.remove("api-key")
    assert store.names() == ["db.pass"]


def test_store_file_holds_no_plaintext(store: SecretStore) -> None:
    value = "v-" + random_source.token_hex(16)
    store.put("tok", value)
    for p in store.root.iterdir():
        assert value.encode() not in p.read_bytes(), p
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600


def test_unknown_name_lists_known(store: SecretStore) -> None:
    store.put("alpha", "aaaa-1")
    with pytest.raises(SecretNotFound) as info:
        store.get("beta")
    assert "alpha" in (info.value.hint or "")
    assert info.value.data["known"] == "alpha"
    with pytest.raises(SecretNotFound):
        store.resolve({"X": "alpha", "Y": "beta"})


def test_resolve(store: SecretStore) -> None:
    store.put("alpha", "aaaa-1")
    assert store.resolve({"A": "alpha"}) == {"A": "aaaa-1"}


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "é"])
def test_bad_names(store: SecretStore, name: str) -> None:
    with pytest.raises(SecretError):
        store.put(name, "value-1")


@pytest.mark.parametrize("value", ["", "abc", "a\0bcdef", "x" * (64 * 1024 + 1)])
def test_bad_values(store: SecretStore, value: str) -> None:
    with pytest.raises(SecretError):
        store.put("n", value)
    assert store.names() == []


def test_ciphertext_bound_to_name(store: SecretStore) -> None:
    """Moving one secret's ciphertext under another name must not decrypt."""
    store.put("a", "value-a")
    store.put("b", "value-b")
    raw = store.path.read_text()
    import json

    data = json.loads(raw)
    data["secrets"]["b"] = data["secrets"]["a"]
    store.path.write_text(json.dumps(data))
    with pytest.raises(SecretError, match="does not decrypt"):
        store.get("b")


def test_world_readable_key_refused(store: SecretStore) -> None:
    store.put("a", "value-a")
    os.chmod(store.key_path, 0o644)
    with pytest.raises(SecretError, match="readable by others"):
        store.get("a")


def test_damaged_store_is_a_clear_error(store: SecretStore) -> None:
    store.put("a", "value-a")
    store.path.write_text("{not json")
    with pytest.raises(SecretError, match="damaged"):
        store.names()


def test_secret_ref() -> None:
    assert secret_ref("secret:api-key") == "api-key"
    assert secret_ref("plain") is None
