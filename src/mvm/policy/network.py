"""Network policy: which names and ports a sandbox may reach, and which addresses never.

Everything here is a pure function of its inputs (patterns, host names, addresses,
configuration text), so the egress proxy's decisions can be tested without a VM.
The few readers of host configuration (apt sources, pip config, interface
addresses) sit at the bottom, clearly marked, and only feed text into the pure parts.

A pattern is ``host[:port]``: ``example.org`` (exactly that name), ``*.example.org``
(any name below it, not the bare domain), or a literal IP address (``198.51.100.2``,
``[2001:db8::1]:8443``). Without a port a pattern allows 80 and 443.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mvm.errors import InvalidArgument

PRESETS = ("none", "registries", "dev", "unrestricted")
#: Ports a pattern without an explicit port allows.
DEFAULT_PORTS = (80, 443)
#: Most patterns one sandbox may carry (bounds the policy and the audit records).
MAX_PATTERNS = 256
MAX_NAME = 253

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

#: Addresses no sandbox may reach, whatever its policy (the slirp network itself is
#: 10.0.2.0/24: its gateway is the host).
ALWAYS_REFUSED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "unspecified"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local or metadata"),
    (ipaddress.ip_network("10.0.2.0/24"), "the sandbox network (slirp)"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast"),
    (ipaddress.ip_network("240.0.0.0/4"), "reserved or broadcast"),
    (ipaddress.ip_network("::/128"), "unspecified"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("ff00::/8"), "multicast"),
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Pattern:
    """One allowlist entry. ``host`` is lower-case; ``wildcard`` means ``*.host``."""

    host: str
    port: int | None = None
    wildcard: bool = False
    ip: IPAddress | None = None

    def __str__(self) -> str:
        h = f"*.{self.host}" if self.wildcard else self.host
        if self.ip is not None and self.ip.version == 6:
            h = f"[{h}]"
        return h if self.port is None else f"{h}:{self.port}"

    def matches(self, host: str, port: int) -> bool:
        if self.port is None:
            if port not in DEFAULT_PORTS:
                return False
        elif port != self.port:
            return False
        if self.ip is not None:
            return parse_ip(host) == self.ip
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


@dataclass(frozen=True)
class Policy:
    """What one sandbox may reach: a preset plus its allowlist."""

    preset: str = "none"
    patterns: tuple[Pattern, ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether the sandbox gets a NIC at all."""
        return self.preset != "none" or bool(self.patterns)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the pattern or preset that allowed, or the rule that refused
    reason: str = ""


@dataclass(frozen=True)
class Target:
    """A parsed ``host:port`` the guest asked for; ``ip`` is set for literal addresses."""

    host: str
    port: int
    ip: IPAddress | None = field(default=None)


def parse_ip(text: str) -> IPAddress | None:
    t = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def normalize_name(name: str) -> str:
    """A DNS name, lower-cased and without a trailing dot, or InvalidArgument."""
    n = name.strip().lower().removesuffix(".")
    if not n or len(n) > MAX_NAME:
        raise InvalidArgument(f"invalid host name {name[:80]!r}", hint="a DNS name, e.g. pypi.org")
    labels = n.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise InvalidArgument(
            f"invalid host name {name[:80]!r}",
            hint="letters, digits, '-' and '_' in dot-separated labels, e.g. files.example.org",
        )
    if n.replace(".", "").isdigit():
        raise InvalidArgument(f"invalid host name {name[:80]!r}: looks like a partial IP address")
    return n


def _split_port(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (``[v6]:port`` for IPv6); the port is checked to be 1-65535."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidArgument(f"invalid address {text[:80]!r}: missing ']'")
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise InvalidArgument(f"invalid address {text[:80]!r}")
        return host, _port(rest[1:], text)
    if text.count(":") > 1:  # a bare IPv6 address, no port
        return text, None
    if ":" in text:
        host, _, p = text.partition(":")
        return host, _port(p, text)
    return text, None


def _port(p: str, whole: str) -> int:
    if not p.isascii() or not p.isdigit() or len(p) > 5 or not 1 <= int(p) <= 65535:
        raise InvalidArgument(f"invalid port in {whole[:80]!r}", hint="a port is 1-65535")
    return int(p)


def parse_pattern(text: str) -> Pattern:
    """``host[:port]``, ``*.domain[:port]`` or an IP address, or InvalidArgument."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_NAME + 10:
        raise InvalidArgument(f"invalid network pattern {str(text)[:80]!r}")
    host, port = _split_port(text.strip())
    ip = parse_ip(host)
    if ip is not None:
        return Pattern(host=str(ip), port=port, ip=ip)
    if host.startswith("[") or ":" in host:
        raise InvalidArgument(f"invalid IP address in {text[:80]!r}")
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise InvalidArgument(
            f"invalid network pattern {text[:80]!r}",
            hint="a wildcard is only allowed as the first label: *.example.org",
        )
    name = normalize_name(host)
    if wildcard and "." not in name:
        raise InvalidArgument(
            f"wildcard {text[:80]!r} is too broad", hint="name a domain: *.example.org"
        )
    return Pattern(host=name, port=port, wildcard=wildcard)


def parse_target(text: str, default_port: int | None = None) -> Target:
    """The ``host:port`` of a CONNECT or of an absolute URL's authority."""
    if len(text) > MAX_NAME + 10:
        raise InvalidArgument("target too long")
    host, port = _split_port(text)
    if port is None:
        if default_port is None:
            raise InvalidArgument(f"no port in {text[:80]!r}")
        port = default_port
    ip = parse_ip(host)
    if ip is not None:
        return Target(host=str(ip), port=port, ip=ip)
    return Target(host=normalize_name(host), port=port)


def make_policy(
    preset: str, allow: Sequence[str], preset_patterns: Iterable[Pattern] = ()
) -> Policy:
    """A policy from a preset name and ``allow`` entries (``preset_patterns``: what the preset
    expands to on this host, see ``preset_patterns``)."""
    if preset not in PRESETS:
        raise InvalidArgument(
            f"unknown network preset {preset!r}", hint=f"one of: {', '.join(PRESETS)}"
        )
    if len(allow) > MAX_PATTERNS:
        raise InvalidArgument(f"too many network allow entries ({len(allow)} > {MAX_PATTERNS})")
    pats = [parse_pattern(a) for a in allow]
    seen: set[Pattern] = set()
    out = []
    for p in [*pats, *preset_patterns]:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return Policy(preset=preset, patterns=tuple(out))


def decide(policy: Policy, target: Target) -> Decision:
    """Allow or refuse a name (or literal address) and port, before any resolution.

    A literal IP is allowed only by a pattern naming that exact address, even under
    ``unrestricted``: that preset opens any *name*, not a way around naming."""
    for p in policy.patterns:
        if (p.ip is not None) == (target.ip is not None) and p.matches(target.host, target.port):
            return Decision(True, str(p))
    if target.ip is not None:
        return Decision(
            False, "raw-ip", "a raw IP address is reachable only when it is in the allowlist"
        )
    if policy.preset == "unrestricted":
        return Decision(True, "preset:unrestricted")
    return Decision(False, "not-allowed", f"{target.host}:{target.port} is not in the allowlist")


def address_refusal(addr: IPAddress, host_addresses: Iterable[IPAddress] = ()) -> str | None:
    """Why ``addr`` may never be reached from a sandbox, or None when it may."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for net, why in ALWAYS_REFUSED:
        if addr.version == net.version and addr in net:
            return why
    if addr.is_unspecified or addr.is_loopback or addr.is_link_local or addr.is_multicast:
        return "loopback, link-local or multicast"
    if addr in set(host_addresses):
        return "an address of the host itself"
    return None


# -- presets: what they expand to, from configuration text (pure) ------------------------


def url_pattern(url: str) -> Pattern | None:
    """The pattern for a repository URL (its host, and port when the URL names one)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    try:
        if port is None:
            return parse_pattern(host if ":" not in host else f"[{host}]")
        return parse_pattern(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except InvalidArgument:
        return None


def pip_index_urls(config_texts: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """Index URLs pip would use: ``index-url``/``extra-index-url`` from its config files
    (sections global, install, download), then PIP_INDEX_URL / PIP_EXTRA_INDEX_URL."""
    urls: list[str] = []
    for text in config_texts:
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            cp.read_string(text)
        except configparser.Error:
            continue
        for section in ("global", "install", "download"):
            if not cp.has_section(section):
                continue
            for key in ("index-url", "extra-index-url", "find-links"):
                urls += cp.get(section, key, fallback="").split()
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        urls += environ.get(key, "").split()
    return [u for u in urls if u.startswith(("http://", "https://"))]


def registry_patterns(
    apt_uris: Iterable[str], pip_urls: Iterable[str], pip_default: Iterable[str]
) -> list[Pattern]:
    """The ``registries`` preset: the hosts of the apt sources and pip indexes; pip's own
    default index (``pip_default``: host names pip itself reports) when none is configured."""
    pip_list = list(pip_urls)
    out: list[Pattern] = []
    for url in [*apt_uris, *pip_list]:
        p = url_pattern(url)
        if p is not None and p not in out:
            out.append(p)
    if not pip_list:
        for host in pip_default:
            p = url_pattern(f"https://{host}/")
            if p is not None and p not in out:
                out.append(p)
    return out


def dev_patterns(toml_text: str) -> list[Pattern]:
    """Extra patterns of the ``dev`` preset from ``$MVM_HOME/network.toml``:
    ``[dev] allow = ["host[:port]", ...]``."""
    import tomllib

    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"network.toml is not valid TOML: {exc}") from None
    allow = doc.get("dev", {}).get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise InvalidArgument('network.toml: [dev] allow must be a list of "host[:port]" strings')
    return [parse_pattern(a) for a in allow]


def parse_resolve_override(text: str) -> dict[str, list[IPAddress]]:
    """``MVM_EGRESS_RESOLVE="name=ip,name2=ip2"`` (like curl --resolve): fixed answers for
    names, for tests and air-gapped hosts. A name may repeat to give several addresses."""
    out: dict[str, list[IPAddress]] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, ip_text = item.partition("=")
        ip = parse_ip(ip_text.strip())
        if not sep or ip is None:
            raise InvalidArgument(
                f"bad MVM_EGRESS_RESOLVE entry {item[:80]!r}", hint="use name=ip,name2=ip"
            )
        out.setdefault(normalize_name(name), []).append(ip)
    return out


def parse_fib_trie_local(text: str) -> set[IPAddress]:
    """IPv4 addresses marked ``/32 host LOCAL`` in ``/proc/net/fib_trie``."""
    out: set[IPAddress] = set()
    last: str | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|--") or s.startswith("+--"):
            last = s[3:].strip().split("/")[0].split()[0]
        elif "/32 host LOCAL" in s and last is not None:
            ip = parse_ip(last)
            if ip is not None:
                out.add(ip)
    return out


def parse_if_inet6(text: str) -> set[IPAddress]:
    """IPv6 addresses from ``/proc/net/if_inet6`` (32 hex digits per line)."""
    out: set[IPAddress] = set()
    for line in text.splitlines():
        h = line.split()[0] if line.split() else ""
        if len(h) == 32:
            try:
                out.add(ipaddress.IPv6Address(bytes.fromhex(h)))
            except ValueError:
                continue
    return out


# -- readers of host configuration (side effects, kept small) --------------------------


def host_addresses() -> set[IPAddress]:
    """Every address of this host's own interfaces."""
    out: set[IPAddress] = set()
    for path, parse in (
        ("/proc/net/fib_trie", parse_fib_trie_local),
        ("/proc/net/if_inet6", parse_if_inet6),
    ):
        try:
            out |= parse(Path(path).read_text())
        except OSError:
            continue
    return out


def pip_config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's configuration files, in pip's own order (site, user, env, PIP_CONFIG_FILE)."""
    home = Path(environ.get("HOME", str(Path.home())))
    xdg = [Path(p) for p in environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":") if p]
    files = [d / "pip" / "pip.conf" for d in xdg] + [Path("/etc/pip.conf")]
    files += [home / ".pip" / "pip.conf", home / ".config" / "pip" / "pip.conf"]
    files.append(Path(sys.prefix) / "pip.conf")
    if environ.get("PIP_CONFIG_FILE"):
        files.append(Path(environ["PIP_CONFIG_FILE"]))
    return files


def pip_default_hosts() -> list[str]:
    """The hosts of pip's built-in default index, asked of pip itself (this Python's, else
    the system ``python3``'s). Empty when no pip is installed."""
    code = (
        "from pip._internal.models.index import PyPI; print(PyPI.netloc, PyPI.file_storage_domain)"
    )
    for exe in (sys.executable, "python3"):
        try:
            r = subprocess.run(
                [exe, "-I", "-c", code], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()[:4]
    return []


def host_registry_patterns(etc_apt: Path = Path("/etc/apt")) -> list[Pattern]:
    """The ``registries`` preset on this host: apt sources, pip config, pip's default."""
    from mvm.images.apt_sources import host_sources

    apt_uris = [u for s in host_sources(etc_apt) for u in s.uris]
    texts = []
    for f in pip_config_files(os.environ):
        try:
            texts.append(f.read_text(errors="replace"))
        except OSError:
            continue
    pip_urls = pip_index_urls(texts, os.environ)
    return registry_patterns(apt_uris, pip_urls, [] if pip_urls else pip_default_hosts())


def preset_patterns(preset: str, mvm_home: Path) -> list[Pattern]:
    """What ``preset`` expands to on this host (``none`` and ``unrestricted``: nothing)."""
    if preset == "registries":
        return host_registry_patterns()
    if preset == "dev":
        extra: list[Pattern] = []
        f = mvm_home / "network.toml"
        if f.is_file():
            extra = dev_patterns(f.read_text(errors="replace"))
        return [*host_registry_patterns(), *extra]
    return []
