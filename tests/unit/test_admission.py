"""Admission: every rule denies with its name, all denials are collected, policy files parse."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.api.models import CreateSandbox, NetworkSpec, PortSpec
from mvm.errors import PolicyFileError
from mvm.policy.admission import (
    Policy,
    SandboxPlan,
    admit,
    denied_error,
    host_within,
    load_policy,
    parse_policy,
    plan_from_create,
)


def rules(plan: SandboxPlan, policy: Policy | None = None, **kw: object) -> list[str]:
    d = admit(plan, policy or Policy(), **kw)  # type: ignore[arg-type]
    assert d.allowed == (not d.denials)
    return [x.rule for x in d.denials]


def test_default_plan_is_admitted() -> None:
    d = admit(SandboxPlan(image="python"), Policy(), known_images={"python"})
    assert d.allowed and d.denials == ()


def test_image_rules() -> None:
    assert rules(SandboxPlan(image="evil"), known_images={"python"}) == ["image"]
    assert rules(SandboxPlan(image="node"), Policy(allowed_images=("py*",))) == ["image"]
    assert rules(SandboxPlan(image="python"), Policy(allowed_images=("py*",))) == []


@pytest.mark.parametrize(
    ("plan", "rule"),
    [
        (SandboxPlan(image="i", cpus=5), "cpus"),
        (SandboxPlan(image="i", cpus=0), "cpus"),
        (SandboxPlan(image="i", memory_mb=9000), "memory"),
        (SandboxPlan(image="i", disk_mb=9000), "disk"),
        (SandboxPlan(image="i", ttl_seconds=8 * 24 * 3600), "ttl"),
        (SandboxPlan(image="i", ttl_seconds=0), "ttl"),
        (SandboxPlan(image="i", ttl_seconds=float("nan")), "ttl"),
        (SandboxPlan(image="i", ports=(("0.0.0.0", 8080, 80, True),)), "ports.wildcard"),
        (SandboxPlan(image="i", ports=(("127.0.0.1", 8080, 0, False),)), "ports.range"),
        (SandboxPlan(image="i", ports=(("127.0.0.1", 0, 80, False),) * 17), "ports.count"),
        (SandboxPlan(image="i", mounts=("/etc",)), "mounts"),
        (SandboxPlan(image="i", mounts=("relative/dir",)), "mounts"),
    ],
)
def test_each_rule(plan: SandboxPlan, rule: str) -> None:
    assert rule in rules(plan)


def test_all_denials_collected_and_named_in_error() -> None:
    plan = SandboxPlan(image="i", cpus=64, memory_mb=10**6, ttl_seconds=-1, mounts=("/",))
    d = admit(plan, Policy())
    assert [x.rule for x in d.denials] == ["cpus", "memory", "ttl", "mounts"]
    err = denied_error(d)
    for rule in ("[cpus]", "[memory]", "[ttl]", "[mounts]"):
        assert rule in err.message
    assert err.data["rules"] == "cpus,memory,ttl,mounts"
    assert "max_cpus=4" in err.message


def test_mounts_under_roots() -> None:
    pol = Policy(mount_roots=("/srv/data",))
    assert rules(SandboxPlan(image="i", mounts=("/srv/data/x",)), pol) == []
    assert rules(SandboxPlan(image="i", mounts=("/srv/data",)), pol) == []
    assert rules(SandboxPlan(image="i", mounts=("/srv/database",)), pol) == ["mounts"]
    assert rules(SandboxPlan(image="i", mounts=("/srv/data/../../etc",)), pol) == ["mounts"]
    proj = SandboxPlan(image="i", mounts=("/home/u/proj/src",))
    assert rules(proj, mount_roots=("/home/u/proj",)) == []


def test_network_rules() -> None:
    pol = Policy(
        allowed_hosts=("*.example.org", "pypi.org:443"),
        allowed_network_presets=("none", "registries"),
    )
    ok = SandboxPlan(
        image="i", network_preset="registries", network_allow=("api.example.org", "pypi.org:443")
    )
    assert rules(ok, pol) == []
    bad = SandboxPlan(
        image="i", network_preset="dev", network_allow=("*.org", "pypi.org", "example.org")
    )
    assert rules(bad, pol) == ["network.preset", "network.allow", "network.allow", "network.allow"]
    unrestricted = SandboxPlan(image="i", network_preset="unrestricted")
    assert rules(unrestricted, Policy(allowed_hosts=("*.example.org",))) == ["network.preset"]


def test_host_within() -> None:
    assert host_within("a.b.example.org", "*.example.org")
    assert host_within("*.b.example.org", "*.example.org")
    assert not host_within("example.org", "*.example.org")
    assert not host_within("evilexample.org", "*.example.org")
    assert not host_within("*.example.org", "example.org")
    assert host_within("x.org:80", "*")
    assert not host_within("pypi.org", "pypi.org:443")
    assert host_within("PyPI.org:443", "pypi.org:443")


@given(st.from_regex(r"[a-z0-9.*-]{1,30}(:[0-9]{1,5})?", fullmatch=True))
def test_star_permits_everything(entry: str) -> None:
    assert host_within(entry, "*")


def test_secrets_rule() -> None:
    pol = Policy(allowed_secrets=("ci-*",))
    assert rules(SandboxPlan(image="i", secrets=("ci-token", "prod-db")), pol) == ["secrets"]


def test_plan_from_create() -> None:
    req = CreateSandbox(
        image="python",
        cpus=2,
        network=NetworkSpec(preset="dev", allow=["a.example.org"]),
        ports=[PortSpec(guest_port=80, host_port=8080)],
        mounts=["/srv/x"],
        secret_env={"A": "tok", "B": "tok", "C": "db"},
    )
    plan = plan_from_create(req)
    assert plan.cpus == 2 and plan.network_preset == "dev"
    assert plan.network_allow == ("a.example.org",)
    assert plan.ports == (("127.0.0.1", 8080, 80, False),)
    assert plan.secrets == ("db", "tok")


def test_load_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVM_POLICY", raising=False)
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    assert load_policy() == Policy()
    (tmp_path / "policy.toml").write_text('max_cpus = 2\nallowed_images = ["python"]\n')
    assert load_policy() == Policy(max_cpus=2, allowed_images=("python",))
    other = tmp_path / "other.toml"
    other.write_text("max_ttl_seconds = 60\n")
    monkeypatch.setenv("MVM_POLICY", str(other))
    assert load_policy().max_ttl_seconds == 60
    monkeypatch.setenv("MVM_POLICY", str(tmp_path / "missing.toml"))
    with pytest.raises(PolicyFileError, match="does not exist"):
        load_policy()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_cpus = [", "not valid TOML"),
        ("max_cpuz = 2", "unknown policy key"),
        ('max_cpus = "two"', "max_cpus"),
        ('allowed_network_presets = ["wide-open"]', "unknown network preset"),
    ],
)
def test_bad_policy_files(text: str, match: str) -> None:
    with pytest.raises(PolicyFileError, match=match):
        parse_policy(text, "p.toml")
