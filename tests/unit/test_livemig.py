"""The pieces of live migration that need no VM: the key's form and file, the port QEMU
reports, and the plan's shape (the migration itself is tested against real VMs in
tests/integration/test_cluster.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec
import pytest

from mvm.api import migrate as G
from mvm.errors import VMError
from mvm.vmm import livemig


def test_a_key_is_64_lowercase_hex_digits() -> None:
    good = "ab" * 32
    assert livemig.check_key(good) == good
    for bad in ("", "ab" * 31, "AB" * 32, "zz" * 32, good + "\n", "ab" * 31 + "a:"):
        with pytest.raises(VMError):
            livemig.check_key(bad)


def test_the_key_file_is_private_and_removed(tmp_path: Path) -> None:
    d = livemig.write_key(tmp_path, "cd" * 32)
    f = d / "keys.psk"
    assert f.read_text() == f"{livemig.PSK_USER}:{'cd' * 32}\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    livemig.drop_key(tmp_path)
    assert not d.exists()
    livemig.drop_key(tmp_path)  # idempotent


def test_the_listening_port_comes_from_query_migrate() -> None:
    info = {
        "status": "setup",
        "socket-address": [{"type": "inet", "host": "10.0.0.2", "port": "41234"}],
    }
    assert livemig._listening_port(info) == 41234
    for bad in ({}, {"socket-address": [{"type": "unix", "path": "/x"}]}, None):
        with pytest.raises(VMError):
            livemig._listening_port(bad)


def test_a_plan_round_trips_and_migrate_bodies_refuse_unknown_fields() -> None:
    plan = G.MigrationPlan(id="sb-0123456789", image_id="i", expires_at=1.0, procs=[1, 2])
    back = msgspec.json.decode(msgspec.json.encode(plan), type=G.MigrationPlan)
    assert back == plan
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"uri": "tcp:a:1", "key": "k", "extra": 1}', type=G.MigrateOut)
