"""Admission: the one pure decision every mutating verb goes through.

``admit(plan, policy)`` looks at what a sandbox would get (image, resources, network,
ports, host directories, secret names) and at what the policy permits, and answers
allow or deny with *every* broken rule, each named by a short stable string so users
and programs can tell which limit stopped them. The verbs after create are judged by
the same rules: ``admit_forward`` (ports), ``admit_ttl`` (ttl), ``admit_exec`` (secrets,
root), ``admit_uploads`` (host files copied in, as mounts). They do no I/O: callers
build the plan (``plan_from_create`` for API requests, the SDK from its IR), take the
policy from a ``PolicySource`` (one file, re-read when it changes) and pass the facts
they know (built images, project directory). The policy itself, its file and its reload
rule live in ``source`` (re-exported here).
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from mvm import errors

# The policy, its file and its reload rule live in ``source``; re-exported as before.
from mvm.policy.source import NETWORK_PRESETS as NETWORK_PRESETS
from mvm.policy.source import Policy as Policy
from mvm.policy.source import PolicySource as PolicySource
from mvm.policy.source import load_policy as load_policy
from mvm.policy.source import parse_policy as parse_policy
from mvm.policy.source import policy_path as policy_path

if TYPE_CHECKING:
    from mvm.api.models import CreateSandbox, SandboxShape


#: The stable rule names a Denial can carry.
RULES = (
    "image",
    "cpus",
    "memory",
    "disk",
    "ttl",
    "network.preset",
    "network.allow",
    "ports.wildcard",
    "ports.count",
    "ports.range",
    "mounts",
    "secrets",
    "exec.user",
)


@dataclass(frozen=True)
class SandboxPlan:
    """What a launch asks for, reduced to the facts admission judges."""

    image: str
    cpus: int = 1
    memory_mb: int = 512
    disk_mb: int | None = None
    ttl_seconds: float = 1800.0
    network_preset: str = "none"
    network_allow: tuple[str, ...] = ()
    #: (host, host_port, guest_port, allow_wildcard)
    ports: tuple[tuple[str, int, int, bool], ...] = ()
    #: absolute host paths that will be copied/mounted in
    mounts: tuple[str, ...] = ()
    #: secret NAMES referenced
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Denial:
    rule: str
    message: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    denials: tuple[Denial, ...] = ()
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- the decision


def admit(
    plan: SandboxPlan,
    policy: Policy,
    *,
    known_images: Collection[str] | None = None,
    mount_roots: Sequence[str] = (),
) -> Decision:
    """Check every rule and collect every denial (pure: no I/O, no clock)."""
    denials: list[Denial] = []
    notes: list[str] = []
    denials += _check_image(plan, policy, known_images)
    denials += _check_resources(plan, policy)
    net_denials, net_notes = _check_network(plan, policy)
    denials += net_denials
    notes += net_notes
    denials += _check_ports(plan, policy)
    denials += _check_mounts(plan, (*policy.mount_roots, *mount_roots))
    denials += _check_secrets(plan, policy)
    return Decision(allowed=not denials, denials=tuple(denials), notes=tuple(notes))


def _check_image(
    plan: SandboxPlan, policy: Policy, known_images: Collection[str] | None
) -> list[Denial]:
    out: list[Denial] = []
    if policy.allowed_images is not None and not any(
        fnmatchcase(plan.image, p) for p in policy.allowed_images
    ):
        allowed = ", ".join(policy.allowed_images) or "(none)"
        out.append(Denial("image", f"image {plan.image!r} is not in allowed_images ({allowed})"))
    if known_images is not None and plan.image not in known_images:
        out.append(Denial("image", f"image {plan.image!r} is not built"))
    return out


def _check_resources(plan: SandboxPlan, policy: Policy) -> list[Denial]:
    out: list[Denial] = []
    if not 1 <= plan.cpus <= policy.max_cpus:
        out.append(Denial("cpus", f"{plan.cpus} CPUs is outside 1..max_cpus={policy.max_cpus}"))
    if not 1 <= plan.memory_mb <= policy.max_memory_mb:
        out.append(
            Denial(
                "memory",
                f"{plan.memory_mb} MiB of memory is outside 1..max_memory_mb={policy.max_memory_mb}",
            )
        )
    if plan.disk_mb is not None and not 1 <= plan.disk_mb <= policy.max_disk_mb:
        out.append(
            Denial(
                "disk", f"{plan.disk_mb} MiB of disk is outside 1..max_disk_mb={policy.max_disk_mb}"
            )
        )
    out += _check_ttl(plan.ttl_seconds, policy)
    return out


def _check_ttl(ttl: float, policy: Policy) -> list[Denial]:
    if not (ttl == ttl and 0 < ttl <= policy.max_ttl_seconds):  # ttl == ttl: not NaN
        return [
            Denial(
                "ttl", f"TTL {ttl:g}s is outside (0, max_ttl_seconds={policy.max_ttl_seconds:g}]"
            )
        ]
    return []


def _split_hostport(entry: str) -> tuple[str, int | None]:
    """``host[:port]`` -> (lower-case host, port or None). A bare IPv6 address has no port."""
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host.lower(), int(port)
    if entry.startswith("[") and "]:" in entry:
        h, _, p = entry[1:].partition("]:")
        if p.isdigit():
            return h.lower(), int(p)
    return entry.strip("[]").lower(), None


def host_within(entry: str, pattern: str) -> bool:
    """Does allowlist ``entry`` reach only hosts that policy ``pattern`` permits?

    ``*`` permits everything; ``*.example.org`` permits its subdomains (and wildcard
    entries below it) but not ``example.org`` itself; a pattern with a port permits only
    entries naming that port.
    """
    e_host, e_port = _split_hostport(entry)
    p_host, p_port = _split_hostport(pattern)
    if p_port is not None and e_port != p_port:
        return False
    if p_host == "*":
        return True
    if p_host.startswith("*."):
        return e_host.endswith(p_host[1:]) and len(e_host) > len(p_host) - 1
    return not e_host.startswith("*") and e_host == p_host


def _check_network(plan: SandboxPlan, policy: Policy) -> tuple[list[Denial], list[str]]:
    out: list[Denial] = []
    notes: list[str] = []
    preset = plan.network_preset
    if preset not in policy.allowed_network_presets:
        allowed = ", ".join(policy.allowed_network_presets) or "(none)"
        out.append(
            Denial(
                "network.preset",
                f"network preset {preset!r} is not in allowed_network_presets ({allowed})",
            )
        )
    elif preset == "unrestricted" and "*" not in policy.allowed_hosts:
        out.append(
            Denial(
                "network.preset",
                "network preset 'unrestricted' reaches any host, but allowed_hosts is limited to "
                + ", ".join(policy.allowed_hosts),
            )
        )
    for entry in plan.network_allow:
        if not entry or any(c.isspace() for c in entry):
            out.append(Denial("network.allow", f"allowlist entry {entry!r} is not host[:port]"))
        elif not any(host_within(entry, p) for p in policy.allowed_hosts):
            out.append(
                Denial(
                    "network.allow",
                    f"allowlist entry {entry!r} is not within allowed_hosts ("
                    + (", ".join(policy.allowed_hosts) or "(none)")
                    + ")",
                )
            )
    if preset == "none" and plan.network_allow:
        notes.append("network preset 'none' with allowlist entries: the entries open egress")
    return out, notes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_ports(plan: SandboxPlan, policy: Policy, existing: int = 0) -> list[Denial]:
    out: list[Denial] = []
    count = existing + len(plan.ports)
    if count > policy.max_ports:
        out.append(
            Denial(
                "ports.count",
                f"{count} port forwards exceeds max_ports={policy.max_ports}",
            )
        )
    for host, host_port, guest_port, allow_wildcard in plan.ports:
        if not 1 <= guest_port <= 65535 or not 0 <= host_port <= 65535:
            out.append(
                Denial(
                    "ports.range",
                    f"port {host_port}->{guest_port}: guest port must be 1..65535, "
                    "host port 0..65535",
                )
            )
        if not _is_loopback(host):
            if not policy.allow_wildcard_ports:
                out.append(
                    Denial(
                        "ports.wildcard",
                        f"forward on {host or '*'}:{host_port} is reachable beyond this host; "
                        "policy allow_wildcard_ports=false",
                    )
                )
            elif not allow_wildcard:
                out.append(
                    Denial(
                        "ports.wildcard",
                        f"forward on {host or '*'}:{host_port} binds beyond loopback "
                        "without allow_wildcard",
                    )
                )
    return out


def _within_root(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_mounts(plan: SandboxPlan, roots: Sequence[str]) -> list[Denial]:
    """Mounts must be absolute and, normalised, under an allowed root.

    Pure: the caller resolves symlinks (``os.path.realpath``) before building the plan.
    """
    out: list[Denial] = []
    good_roots = [r for r in roots if r.startswith("/")]
    for m in plan.mounts:
        if not m.startswith("/"):
            out.append(Denial("mounts", f"mount {m!r} is not an absolute host path"))
            continue
        norm = posixpath.normpath(m)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        if not any(_within_root(norm, r) for r in good_roots):
            where = ", ".join(good_roots) or "none configured"
            out.append(Denial("mounts", f"mount {m!r} is not under an allowed root ({where})"))
    return out


def _check_secrets(plan: SandboxPlan, policy: Policy) -> list[Denial]:
    if policy.allowed_secrets is None:
        return []
    allowed = ", ".join(policy.allowed_secrets) or "(none)"
    return [
        Denial("secrets", f"secret {name!r} is not in allowed_secrets ({allowed})")
        for name in plan.secrets
        if not any(fnmatchcase(name, p) for p in policy.allowed_secrets)
    ]


# ---------------------------------------------------------------- the verbs after create


def _decision(denials: list[Denial]) -> Decision:
    return Decision(allowed=not denials, denials=tuple(denials))


def admit_forward(port: tuple[str, int, int, bool], existing: int, policy: Policy) -> Decision:
    """One more port forward ``(host, host_port, guest_port, allow_wildcard)`` on a sandbox
    that has ``existing`` ones: the same port rules as at create."""
    return _decision(_check_ports(SandboxPlan(image="", ports=(port,)), policy, existing))


def admit_ttl(ttl_seconds: float, policy: Policy) -> Decision:
    """A new TTL (set-ttl): the same ``max_ttl_seconds`` as at create."""
    return _decision(_check_ttl(ttl_seconds, policy))


def is_root(user: str | None) -> bool:
    return user is not None and user.strip() in ("root", "0")


def admit_exec(secrets: Collection[str], user: str | None, policy: Policy) -> Decision:
    """One command (exec or a background process): the secret names it brings and the
    user it runs as."""
    denials = _check_secrets(SandboxPlan(image="", secrets=tuple(sorted(set(secrets)))), policy)
    if is_root(user) and not policy.allow_root_exec:
        denials.append(Denial("exec.user", "commands may not run as root: allow_root_exec=false"))
    return _decision(denials)


def admit_uploads(paths: Sequence[str], policy: Policy) -> Decision:
    """Host paths whose files a client copies in (SDK ``include=``, ``up DIR``): checked as
    mounts against ``mount_roots`` when the policy names any (callers resolve symlinks).
    Without ``mount_roots`` the caller's own project files may enter, as before."""
    if not policy.mount_roots:
        return Decision(allowed=True)
    return _decision(_check_mounts(SandboxPlan(image="", mounts=tuple(paths)), policy.mount_roots))


# ---------------------------------------------------------------- plans and policies


def plan_from_shape(shape: SandboxShape, mounts: Sequence[str] = ()) -> SandboxPlan:
    """The plan of a sandbox shape (a create request, a snapshot being recreated);
    ``mounts`` taken as given: resolve them first."""
    return SandboxPlan(
        image=shape.image,
        cpus=shape.cpus,
        memory_mb=shape.memory_mb,
        disk_mb=shape.disk_mb,
        ttl_seconds=shape.ttl_seconds,
        network_preset=shape.network.preset,
        network_allow=tuple(shape.network.allow),
        ports=tuple((p.host, p.host_port, p.guest_port, p.allow_wildcard) for p in shape.ports),
        mounts=tuple(mounts),
        secrets=tuple(sorted(set(shape.secret_env.values()))),
    )


def plan_from_create(req: CreateSandbox) -> SandboxPlan:
    """The plan of an API create request (``mounts`` taken as given: resolve them first)."""
    return plan_from_shape(req, req.mounts)


def denied_error(decision: Decision, what: str = "the launch") -> errors.PolicyDenied:
    """The error a denial raises: the message names each rule that denied."""
    parts = [f"[{d.rule}] {d.message}" for d in decision.denials]
    return errors.PolicyDenied(
        f"policy denied {what}: " + "; ".join(parts),
        hint="change the request, or the policy file (MVM_POLICY or $MVM_HOME/policy.toml)",
        rules=",".join(dict.fromkeys(d.rule for d in decision.denials)),
        denials=[{"rule": d.rule, "message": d.message} for d in decision.denials],
    )
