"""The SDK's pure parts: declarations, env splitting, includes, ports, durations at the call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mvm
from mvm.errors import InvalidArgument, PolicyDenied
from mvm.sdk import include as inc
from mvm.sdk.backend import SandboxSpec
from mvm.sdk.options import split_env
from mvm.sdk.ports import check_spec, is_wildcard
from mvm.sdk.sandbox import build_spec


def spec(**kw: Any) -> SandboxSpec:
    """``build_spec`` with neutral defaults (``kw`` overrides)."""
    args: dict[str, Any] = {
        "name": None,
        "workload_id": None,
        "ttl": "30m",
        "include": (),
        "tags": None,
        "resources": None,
        "network": None,
        "env": None,
        "base": Path.cwd(),
    }
    args.update(kw)
    return build_spec("python-3.11", **args)


def test_resources_map_to_the_request_and_reject_out_of_bounds() -> None:
    s = spec(resources=mvm.resources(cpu_cores=2, memory_mb=1024, rootfs_size_mb=2048))
    assert (s.cpus, s.memory_mb, s.disk_mb) == (2, 1024, 2048)
    for bad in ({"cpu_cores": 0}, {"memory_mb": 64}, {"rootfs_size_mb": 1}, {"cpu_cores": True}):
        with pytest.raises(InvalidArgument):
            mvm.resources(**bad)  # type: ignore[arg-type]


def test_network_modes() -> None:
    assert mvm.network(mode="deny").spec().preset == "none"
    allow = mvm.network(mode="allow", allow=["pypi.org:443"]).spec()
    assert (allow.preset, allow.allow) == ("none", ["pypi.org:443"])
    for bad in (
        {"mode": "open"},
        {"mode": "allow"},
        {"mode": "deny", "allow": ["x.org"]},
        {"mode": "allow", "allow": "x.org"},
        {"mode": "allow", "allow": ["has space"]},
        {"mode": "allow", "preset": "everything"},
    ):
        with pytest.raises(InvalidArgument):
            mvm.network(**bad)  # type: ignore[arg-type]


def test_secret_ref_shows_only_its_name() -> None:
    ref = mvm.secret("api-key")
    assert repr(ref) == "mvm.secret('api-key')" == str(ref)
    assert split_env({"A": "1", "KEY": ref}) == ({"A": "1"}, {"KEY": "api-key"})
    for bad in ("", "../x", "a b", "x" * 65):
        with pytest.raises(InvalidArgument):
            mvm.secret(bad)


def test_env_values_must_be_str_or_secret() -> None:
    for bad in ({"A": 1}, {"1A": "x"}, {"A": "x\0y"}):
        with pytest.raises(InvalidArgument):
            split_env(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", ["soon", "", "-5", 0, "1x", True, "8d"])
def test_invalid_ttls_fail_at_the_call(ttl: object) -> None:
    with pytest.raises(InvalidArgument):
        spec(ttl=ttl)


def test_durations_and_labels() -> None:
    assert spec(ttl="1h30m").ttl_seconds == 5400
    assert spec(ttl=90).ttl_seconds == 90
    for kw in ({"name": "Bad Name"}, {"tags": {"": "x"}}, {"workload_id": "a b"}):
        with pytest.raises(InvalidArgument):
            spec(**kw)


def test_wildcard_forwards_need_allow_wildcard() -> None:
    for host in ("0.0.0.0", "::", "[::]", "", "*"):
        assert is_wildcard(host)
        with pytest.raises(PolicyDenied):
            check_spec(8000, 0, host, False)
        assert check_spec(8000, 0, host, True).allow_wildcard
    assert not is_wildcard("127.0.0.1")
    assert check_spec(8000, 8080, "127.0.0.1", False).host_port == 8080
    for gp, hp in ((0, 0), (70000, 0), (80, -1)):
        with pytest.raises(InvalidArgument):
            check_spec(gp, hp, "127.0.0.1", False)


# ------------------------------------------------------------------------------- include


def tree(tmp_path: Path) -> Path:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("a")
    (tmp_path / "src" / "pkg" / "b.py").write_text("bb")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "run.sh", 0o755)
    return tmp_path


def test_include_collects_files_with_hashes_and_modes(tmp_path: Path) -> None:
    files = inc.collect(tree(tmp_path), ["src", "run.sh"])
    assert [f.rel for f in files] == ["run.sh", "src/a.py", "src/pkg/b.py"]
    assert [f.guest_path for f in files][1] == "/work/src/a.py"
    assert files[0].mode == 0o755 and files[1].mode == 0o644
    assert files[2].sha256 == inc.file_sha256(tmp_path / "src" / "pkg" / "b.py")


@pytest.mark.parametrize("entry", ["/etc", "../x", "src/../../x", ""])
def test_include_refuses_paths_leaving_the_tree(tmp_path: Path, entry: str) -> None:
    with pytest.raises(InvalidArgument):
        inc.collect(tree(tmp_path), [entry])


def test_include_refuses_symlinks_leaving_the_tree(tmp_path: Path) -> None:
    base = tree(tmp_path / "p")
    (tmp_path / "secret.txt").write_text("host secret")
    (base / "src" / "leak").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(InvalidArgument, match="symlink leaving"):
        inc.collect(base, ["src"])
    (base / "src" / "leak").unlink()
    (base / "src" / "inside").symlink_to(base / "run.sh")  # stays inside: copied as a file
    assert "src/inside" in [f.rel for f in inc.collect(base, ["src"])]
    (base / "src" / "dirlink").symlink_to(base / "src" / "pkg")
    with pytest.raises(InvalidArgument, match="directory symlink"):
        inc.collect(base, ["src"])


def test_include_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tree(tmp_path)
    monkeypatch.setattr(inc, "MAX_FILES", 2)
    with pytest.raises(InvalidArgument, match="more than 2 files"):
        inc.collect(base, ["src", "run.sh"])
    monkeypatch.setattr(inc, "MAX_FILES", 100)
    monkeypatch.setattr(inc, "MAX_BYTES", 2)
    with pytest.raises(InvalidArgument):
        inc.collect(base, ["src"])


@given(st.text(max_size=40))
def test_check_entry_never_yields_an_escaping_path(entry: str) -> None:
    try:
        p = inc.check_entry(entry)
    except InvalidArgument:
        return
    assert not p.is_absolute() and ".." not in p.parts
