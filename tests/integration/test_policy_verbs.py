"""Policy on every mutating verb, not only create: each test is a way around a policy the
operator wrote that mvmd used to allow (issue 10). A real mvmd in a private home, one
sandbox; ``policy.toml`` is rewritten per test (mvmd re-reads it when it changes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from tests.integration.mvmd_home import Ctl, private_home

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

NAME = "pv"


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmpv-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    c = Ctl(home)
    c.env["MVM_SECRETS_KEYRING"] = "0"
    c.env.pop("MVM_POLICY", None)
    return c


@pytest.fixture(scope="module")
def sandbox(ctl: Ctl) -> str:
    ctl.ok("secret", "put", "api-key", input="sk-" + "a" * 20 + "\n")
    ctl.ok("secret", "put", "other-key", input="ok-" + "b" * 20 + "\n")
    ctl.ok("up", "--name", NAME, "--ttl", "20m")
    return NAME


@pytest.fixture
def policy(home: Path) -> Iterator[Path]:
    """The home's policy file, removed after the test (back to the default policy)."""
    p = home / "policy.toml"
    yield p
    p.unlink(missing_ok=True)


def denials(home: Path, verb: str) -> list[dict[str, object]]:
    out = []
    for f in sorted((home / "audit").rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "policy.denied" and rec["data"].get("verb") == verb:
                out.append(rec["data"])
    return out


def test_forward_obeys_allow_wildcard_ports(ctl: Ctl, sandbox: str, home: Path) -> None:
    r = ctl("forward", sandbox, "0:8000", "--host", "0.0.0.0", "--allow-wildcard")
    assert r.rc == 125 and "[ports.wildcard]" in r.err, str(r)
    assert ctl.sandboxes()[sandbox]["forwards"] == []
    assert denials(home, "forward")[-1]["rules"] == ["ports.wildcard"]


def test_forward_obeys_max_ports(ctl: Ctl, sandbox: str, policy: Path) -> None:
    policy.write_text("max_ports = 1\n")
    first = ctl.json("forward", sandbox, "8001")
    try:
        r = ctl("forward", sandbox, "8002")
        assert r.rc == 125 and "[ports.count]" in r.err and "max_ports=1" in r.err, str(r)
    finally:
        ctl.ok("forward", sandbox, "--remove", first["id"])


def test_set_ttl_obeys_the_policy_max(ctl: Ctl, sandbox: str, policy: Path) -> None:
    policy.write_text("max_ttl_seconds = 3600\n")
    r = ctl("set-ttl", sandbox, "2h")
    assert r.rc == 125 and "[ttl]" in r.err and "max_ttl_seconds=3600" in r.err, str(r)
    ctl.ok("set-ttl", sandbox, "30m")


def test_exec_secret_refs_obey_allowed_secrets(ctl: Ctl, sandbox: str, policy: Path) -> None:
    policy.write_text('allowed_secrets = ["api-*"]\n')
    r = ctl("exec", sandbox, "-e", "K=secret:other-key", "--", "touch", "/tmp/ran")
    assert r.rc == 125 and "[secrets]" in r.err and "other-key" in r.err, str(r)
    r = ctl("proc", "start", sandbox, "-e", "K=secret:other-key", "--", "touch", "/tmp/ran")
    assert r.rc == 125 and "[secrets]" in r.err, str(r)
    assert ctl("exec", sandbox, "--", "test", "-e", "/tmp/ran").rc == 1
    ctl.ok("exec", sandbox, "-e", "K=secret:api-key", "--", "true")


def test_root_exec_obeys_allow_root_exec(ctl: Ctl, sandbox: str, policy: Path) -> None:
    ctl.ok("exec", sandbox, "--user", "root", "--", "true")  # the default allows it
    policy.write_text("allow_root_exec = false\n")
    r = ctl("exec", sandbox, "--user", "root", "--", "true")
    assert r.rc == 125 and "[exec.user]" in r.err, str(r)
    ctl.ok("exec", sandbox, "--", "true")


def test_sdk_include_obeys_mount_roots(
    ctl: Ctl, sandbox: str, policy: Path, tmp_path: Path
) -> None:
    (tmp_path / "data.txt").write_text("x")
    script = tmp_path / "inc.py"
    script.write_text(
        "import mvm\n"
        "with mvm.Sandbox.create('python', include=['data.txt']) as sb:\n"
        "    print(sb.files.read('/work/data.txt'))\n"
    )
    policy.write_text('mount_roots = ["/nonexistent-root"]\n')
    r = subprocess.run(
        [sys.executable, str(script)], env=ctl.env, capture_output=True, text=True,
        timeout=240, check=False, cwd="/",
    )  # fmt: skip
    assert r.returncode == 1 and "[mounts]" in r.stderr, r  # the uncaught PolicyDenied
    assert "PolicyDenied" in r.stderr


def test_up_dir_obeys_mount_roots(ctl: Ctl, sandbox: str, policy: Path, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    preset = resources.files("mvm.images").joinpath("presets", "python.toml").read_text()
    (project / "mvm.toml").write_text(preset)  # the default image: nothing to build
    (project / "task.py").write_text("print(1)\n")
    policy.write_text(f'mount_roots = ["{tmp_path / "elsewhere"}"]\n')
    r = ctl("up", str(project), "--name", "updir")
    assert r.rc == 125 and "[mounts]" in r.err, str(r)
    assert "updir" not in ctl.sandboxes()
    policy.write_text(f'mount_roots = ["{tmp_path}"]\n')
    ctl.ok("up", str(project), "--name", "updir")
    ctl.ok("down", "updir")


def test_recreate_from_a_snapshot_is_admitted_and_gets_its_forwards(
    ctl: Ctl, sandbox: str, policy: Path
) -> None:
    ctl.ok("up", "--name", "rec", "--ttl", "20m")
    fwd = ctl.json("forward", "rec", "8000")
    ctl.ok("snapshot", "save", "rec", "s1", timeout=240)
    ctl.ok("down", "rec")
    policy.write_text("max_memory_mb = 256\n")
    r = ctl("snapshot", "restore", "rec", "s1", timeout=240)
    assert r.rc == 125 and "[memory]" in r.err, str(r)
    assert "rec" not in ctl.sandboxes()
    policy.unlink()
    ctl.ok("snapshot", "restore", "rec", "s1", timeout=240)
    back = ctl.sandboxes()["rec"]["forwards"]
    assert [(f["guest_port"], f["host_port"]) for f in back] == [(8000, fwd["host_port"])]
    ctl.ok("down", "rec")


def test_mvm_policy_file_is_reread_when_it_changes(home: Path, tmp_path: Path) -> None:
    """MVM_POLICY (fixed when mvmd starts) follows the same rule as policy.toml: the file
    is read again when it changes, for every verb."""
    pol = tmp_path / "policy.toml"
    pol.write_text("max_ttl_seconds = 86400\n")
    c = Ctl(home)
    c.env["MVM_POLICY"] = str(pol)
    c.ok("daemon", "stop")
    c.ok("up", "--name", "envpol", "--ttl", "20m")  # starts mvmd with MVM_POLICY
    try:
        c.ok("set-ttl", "envpol", "2h")
        pol.write_text("max_ttl_seconds = 3600\n")
        os.utime(pol, ns=(1, 1))  # a change the mtime alone shows
        r = c("set-ttl", "envpol", "2h")
        assert r.rc == 125 and "[ttl]" in r.err, str(r)
    finally:
        c.ok("down", "envpol")
        c.ok("daemon", "stop")
