"""Declarations a script passes to ``Sandbox.create``: resources, network, secret references.

Pure values, validated when they are made, so a bad value fails at the line that wrote it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mvm import names
from mvm.api import models as M
from mvm.errors import InvalidArgument
from mvm.policy.network import PRESETS as NETWORK_PRESETS

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Most ``allow`` entries one network declaration may carry.
MAX_ALLOW = 256
NETWORK_MODES = ("deny", "allow")
PRESETS = NETWORK_PRESETS  # the one list (policy/network.py)


@dataclass(frozen=True)
class Resources:
    """CPU cores, memory, and the size of the writable layer (``rootfs_size_mb``): the root
    filesystem is read-only and shared, so this is the tmpfs overlay every write lands in."""

    cpu_cores: int = M.DEFAULT_CPUS
    memory_mb: int = M.DEFAULT_MEMORY_MB
    rootfs_size_mb: int | None = None


def resources(
    cpu_cores: int = M.DEFAULT_CPUS,
    memory_mb: int = M.DEFAULT_MEMORY_MB,
    rootfs_size_mb: int | None = None,
) -> Resources:
    """Validated ``Resources`` (InvalidArgument names the bound that was crossed): the
    shape's own bounds (``M.BOUNDS``), checked at the line that wrote the value."""
    M.check_bound("cpus", cpu_cores, "cpu_cores")
    M.check_bound("memory_mb", memory_mb)
    if rootfs_size_mb is not None:
        M.check_bound("disk_mb", rootfs_size_mb, "rootfs_size_mb")
    return Resources(cpu_cores, memory_mb, rootfs_size_mb)


@dataclass(frozen=True)
class Network:
    """What the sandbox may reach: ``deny`` (no NIC) or ``allow`` listed ``host[:port]``s,
    optionally on top of a preset."""

    mode: str = "deny"
    allow: tuple[str, ...] = ()
    preset: str = "none"

    def spec(self) -> M.NetworkSpec:
        return M.NetworkSpec(preset=self.preset, allow=list(self.allow))


def network(
    mode: str = "deny", allow: list[str] | tuple[str, ...] = (), preset: str = "none"
) -> Network:
    """``network(mode="deny")`` (the default: no network at all) or
    ``network(mode="allow", allow=["pypi.org:443"])``; ``preset`` picks a curated list."""
    if mode not in NETWORK_MODES:
        raise InvalidArgument(
            f"network mode {mode!r} is not one of {', '.join(NETWORK_MODES)}", mode=mode
        )
    if preset not in PRESETS:
        raise InvalidArgument(
            f"network preset {preset!r} is not one of {', '.join(PRESETS)}", preset=preset
        )
    if isinstance(allow, str):
        raise InvalidArgument("network allow= takes a list of host[:port] patterns, not a string")
    entries = tuple(allow)
    if len(entries) > MAX_ALLOW:
        raise InvalidArgument(f"at most {MAX_ALLOW} network allow entries", count=len(entries))
    for e in entries:
        if not isinstance(e, str) or not e or len(e) > 255 or any(c.isspace() for c in e):
            raise InvalidArgument(f"invalid network allow entry {e!r}", hint="use host[:port]")
    if mode == "deny" and (entries or preset != "none"):
        raise InvalidArgument(
            "network(mode='deny') takes no allow list or preset",
            hint="use mode='allow' to open anything",
        )
    if mode == "allow" and not entries and preset == "none":
        raise InvalidArgument(
            "network(mode='allow') needs an allow list or a preset",
            hint="e.g. network(mode='allow', allow=['pypi.org:443'])",
        )
    return Network(mode, entries, preset)


@dataclass(frozen=True)
class SecretRef:
    """A reference to a secret in the host's store, by name. It holds no value: mvmd resolves
    it when the command starts, so the value never passes through the script."""

    name: str = field()

    def __post_init__(self) -> None:
        names.check("secret", self.name)

    def __repr__(self) -> str:
        return f"mvm.secret({self.name!r})"

    __str__ = __repr__


def secret(name: str) -> SecretRef:
    """``mvm.secret("api-key")``: a reference resolved by the host, never a value."""
    return SecretRef(name)


EnvValue = str | SecretRef


def split_env(env: dict[str, EnvValue] | None) -> tuple[dict[str, str], dict[str, str]]:
    """(plain variables, {variable: secret name}) from an ``env=`` mapping."""
    plain: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for k, v in (env or {}).items():
        if not isinstance(k, str) or not ENV_NAME_RE.match(k):
            raise InvalidArgument(f"invalid environment variable name {k!r}")
        if isinstance(v, SecretRef):
            secrets[k] = v.name
        elif isinstance(v, str):
            if "\0" in v:
                raise InvalidArgument(f"environment variable {k} contains a NUL byte")
            plain[k] = v
        else:
            raise InvalidArgument(
                f"environment variable {k} must be a str or mvm.secret(...), not {type(v).__name__}"
            )
    return plain, secrets
