"""The policy an operator writes: its fields and safe defaults, where the file is found,
how it is parsed (unknown keys are errors), and the one reload rule (``PolicySource``).

Admission (``admission.py``) judges against a ``Policy``; this module is the only one
that reads policy files.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mvm import errors, paths
from mvm.policy import network as N

#: The network presets mvm knows (egress owns what each one reaches).
NETWORK_PRESETS = N.PRESETS  # the one list (policy/network.py)


@dataclass(frozen=True)
class Policy:
    """Limits a launch must stay within. The defaults are the safe out-of-the-box policy."""

    #: fnmatch patterns of image names; None: any built image.
    allowed_images: tuple[str, ...] | None = None
    max_cpus: int = 4
    max_memory_mb: int = 8192
    max_disk_mb: int = 8192
    max_ttl_seconds: float = 7 * 24 * 3600.0
    allowed_network_presets: tuple[str, ...] = NETWORK_PRESETS
    #: host[:port] patterns ("*", "*.example.org", "pypi.org:443") allowlist entries must fall within.
    allowed_hosts: tuple[str, ...] = ("*",)
    #: host directories under which mounts are allowed (plus the caller's project dir).
    mount_roots: tuple[str, ...] = ()
    allow_wildcard_ports: bool = False
    max_ports: int = 16
    #: fnmatch patterns of secret names; None: any secret in the store.
    allowed_secrets: tuple[str, ...] | None = None
    #: May a command run as root in the guest (exec/start with user="root")?
    allow_root_exec: bool = True


def policy_path() -> Path:
    """Where the policy comes from: for a request served for a remote tenant,
    ``$MVM_HOME/policies/<tenant>.toml`` when it exists; else ``MVM_POLICY``, else
    ``$MVM_HOME/policy.toml``."""
    from mvm.audit.log import acting

    who = acting()
    if who is not None:
        own = paths.home() / "policies" / f"{who[0]}.toml"
        if own.is_file():
            return own
    return _base_policy_path()


def _base_policy_path() -> Path:
    """``MVM_POLICY``, else ``$MVM_HOME/policy.toml``."""
    env = os.environ.get("MVM_POLICY")
    return Path(env) if env else paths.home() / "policy.toml"


_FIELDS = {f.name for f in dataclasses.fields(Policy)}


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy TOML (top-level keys named as ``Policy`` fields); unknown keys are errors."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise errors.PolicyFileError(
            f"{source}: not valid TOML: {exc}",
            hint="fix the file or remove it to use the default policy",
            path=source,
        ) from None
    if isinstance(data.get("policy"), dict) and len(data) == 1:
        data = data["policy"]
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise errors.PolicyFileError(
            f"{source}: unknown policy key(s): {', '.join(unknown)}",
            hint="known keys: " + ", ".join(sorted(_FIELDS)),
            path=source,
        )
    try:
        policy = msgspec.convert(data, Policy)
    except msgspec.ValidationError as exc:
        raise errors.PolicyFileError(
            f"{source}: {exc}", hint="see docs/cli.md, 'policy.toml'", path=source
        ) from None
    bad = sorted(set(policy.allowed_network_presets) - set(NETWORK_PRESETS))
    if bad:
        raise errors.PolicyFileError(
            f"{source}: unknown network preset(s) in allowed_network_presets: {', '.join(bad)}",
            hint="presets: " + ", ".join(NETWORK_PRESETS),
            path=source,
        )
    return policy


def load_policy(path: Path | None = None) -> Policy:
    """The policy from ``path``, ``MVM_POLICY``, or ``$MVM_HOME/policy.toml``; defaults if absent.

    An explicitly named file (argument or ``MVM_POLICY``) must exist.
    """
    explicit = path is not None or bool(os.environ.get("MVM_POLICY"))
    p = path if path is not None else policy_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise errors.PolicyFileError(
                f"policy file {p} does not exist",
                hint="create it, or unset MVM_POLICY to use $MVM_HOME/policy.toml",
                path=str(p),
            ) from None
        return Policy()
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.PolicyFileError(
            f"cannot read policy file {p}: {exc}", hint="check its permissions", path=str(p)
        ) from None
    return parse_policy(text, str(p))


class PolicySource:
    """The one policy of a process (mvmd, or ``mvmctl run``) with one reload rule: the file
    is chosen once (``path``, else ``MVM_POLICY``, else ``$MVM_HOME/policy.toml``) and read
    again whenever it changes (mtime, size or inode), before every check. A request served
    for a remote tenant (``audit.log.acting``) uses ``$MVM_HOME/policies/<tenant>.toml``
    instead when that file exists, under the same rule."""

    def __init__(self, path: Path | None = None) -> None:
        self.explicit = path is not None or bool(os.environ.get("MVM_POLICY"))
        self.path = path if path is not None else _base_policy_path()
        self._cache: dict[Path, tuple[tuple[int, int, int], Policy]] = {}

    def current(self) -> Policy:
        from mvm.audit.log import acting

        who = acting()
        if who is not None:
            own = paths.home() / "policies" / f"{who[0]}.toml"
            if own.is_file():
                return self._read(own, explicit=True)
        return self._read(self.path, explicit=self.explicit)

    def _read(self, path: Path, *, explicit: bool) -> Policy:
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return load_policy(path) if explicit else Policy()
        except OSError as exc:
            raise errors.PolicyFileError(
                f"cannot read policy file {path}: {exc}", path=str(path)
            ) from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            cached = (key, load_policy(path))
            self._cache[path] = cached
        return cached[1]
