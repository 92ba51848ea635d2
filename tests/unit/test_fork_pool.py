"""Pure parts of fork and the pool: children's names, the fork request's bounds, the
pool's size settings and its refusal to pool what it must not (no VM is started)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from mvm.api import fork as F
from mvm.service import pool


def test_child_names() -> None:
    assert F.child_names("kid", 1) == ["kid"]
    assert F.child_names("kid", 3) == ["kid-1", "kid-2", "kid-3"]


def test_fork_request_rejects_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name": "a", "ports": []}', type=F.ForkRequest)
    assert msgspec.json.decode(b'{"name": "a"}', type=F.ForkRequest).count == 1


@pytest.mark.parametrize(("value", "size"), [(None, 0), ("0", 0), ("5", 5), ("-3", 0), ("lots", 0)])
def test_pool_size_setting(monkeypatch: pytest.MonkeyPatch, value: str | None, size: int) -> None:
    if value is None:
        monkeypatch.delenv("MVM_POOL_SIZE", raising=False)
    else:
        monkeypatch.setenv("MVM_POOL_SIZE", value)
    assert pool.pool_size() == size


def test_pool_disabled_or_networked_shapes_are_not_pooled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mvm.images.store import ImageStore

    monkeypatch.setenv("MVM_POOL_SIZE", "2")
    monkeypatch.delenv("MVM_POOL_WARM", raising=False)
    off = pool.Pool(ImageStore(tmp_path), enabled=False)
    assert off.size == 0 and off.status()["idle"] == 0

    class Spec:
        network = True

    on = pool.Pool(ImageStore(tmp_path))
    assert on._key(Spec()) is None  # type: ignore[arg-type]
    assert on.status() == {
        "size": 2,
        "max_mb": pool.pool_max_mb(),
        "shapes": 0,
        "idle": 0,
        "idle_mb": 0,
        "handed_out": 0,
        "warm": 1,
    }


def test_pool_warm_is_the_default_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVM_POOL_WARM", raising=False)
    assert pool.pool_warm()
    monkeypatch.setenv("MVM_POOL_WARM", "0")
    assert not pool.pool_warm()
    monkeypatch.setenv("MVM_POOL_WARM", "1")
    assert pool.pool_warm()


def test_a_killed_mvmds_fork_ram_is_reaped_and_a_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import subprocess

    from mvm import forkvm

    monkeypatch.setenv("MVM_FORK_RAM_DIR", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"mvm-fork-{dead.pid}-abc"
    mine = tmp_path / f"mvm-fork-{os.getpid()}-def"
    other = tmp_path / "mvm-fork-notapid-x"
    for p in (orphan, mine, other):
        p.write_bytes(b"x")
    assert forkvm.reap_orphan_ram() == [str(orphan)]
    assert not orphan.exists() and mine.exists() and other.exists()
