"""The host's own Debian apt sources, re-targeted at the suite an image wants.

mvm never names a package mirror: it reads ``/etc/apt/sources.list`` and
``/etc/apt/sources.list.d/*`` and keeps the entries for Debian suites
(``bookworm``, ``bookworm-updates``, ``bookworm-security``, ...), swapping the
codename when the image asks for another release. The result is deb822 text
that mmdebstrap reads from stdin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mvm.errors import HostError

DEBIAN_CODENAMES = frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid"})


@dataclass(frozen=True)
class Source:
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def parse_deb822(text: str) -> list[Source]:
    """Parse deb822 ``.sources`` text; entries that are not ``deb`` or are disabled are skipped."""
    out: list[Source] = []
    for para in _paragraphs(text):
        types = para.get("types", "").split()
        if "deb" not in types or para.get("enabled", "yes").strip().lower() == "no":
            continue
        uris = tuple(para.get("uris", "").split())
        suites = tuple(para.get("suites", "").split())
        comps = tuple(para.get("components", "").split())
        if uris and suites:
            out.append(Source(uris, suites, comps, para.get("signed-by", "").strip() or None))
    return out


def _paragraphs(text: str) -> list[dict[str, str]]:
    paras: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                paras.append(cur)
            cur, key = {}, None
            continue
        if line[0] in " \t" and key is not None:
            cur[key] += "\n" + line.strip()
            continue
        if ":" in line:
            k, _, v = line.partition(":")
            key = k.strip().lower()
            cur[key] = v.strip()
    if cur:
        paras.append(cur)
    return paras


def parse_one_line(text: str) -> list[Source]:
    """Parse classic ``sources.list`` lines (``deb [opts] URI SUITE COMPONENT...``)."""
    out: list[Source] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        signed_by = None
        if rest.startswith("["):
            opts, _, rest = rest[1:].partition("]")
            for opt in opts.split():
                k, _, v = opt.partition("=")
                if k == "signed-by":
                    signed_by = v
        parts = rest.split()
        if len(parts) >= 2:
            out.append(Source((parts[0],), (parts[1],), tuple(parts[2:]), signed_by))
    return out


def codename(suite: str) -> str:
    return suite.split("-", 1)[0].split("/", 1)[0]


def retarget(sources: list[Source], suite: str) -> list[Source]:
    """Keep the Debian entries and point them at ``suite`` (same pockets: -updates, -security)."""
    out: list[Source] = []
    seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    for s in sources:
        suites = []
        for x in s.suites:
            base = codename(x)
            if base not in DEBIAN_CODENAMES:
                continue
            suites.append(suite + x[len(base) :])
        if not suites:
            continue
        key = (s.uris, tuple(suites))
        if key in seen:
            continue
        seen.add(key)
        out.append(Source(s.uris, tuple(suites), s.components or ("main",), s.signed_by))
    return out


def render_deb822(sources: list[Source]) -> str:
    paras = []
    for s in sources:
        lines = [
            "Types: deb",
            f"URIs: {' '.join(s.uris)}",
            f"Suites: {' '.join(s.suites)}",
            f"Components: {' '.join(s.components)}",
        ]
        if s.signed_by:
            signed = s.signed_by.replace("\n", "\n ")
            lines.append(f"Signed-By: {signed}")
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\n"


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[Source]:
    found: list[Source] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        found += parse_one_line(main.read_text(errors="replace"))
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.suffix == ".sources":
                found += parse_deb822(f.read_text(errors="replace"))
            elif f.suffix == ".list":
                found += parse_one_line(f.read_text(errors="replace"))
    return found


def sources_for_suite(suite: str, etc_apt: Path = Path("/etc/apt")) -> str:
    """deb822 text for ``suite`` from the host's configuration, or a HostError saying what to fix."""
    chosen = retarget(host_sources(etc_apt), suite)
    if not chosen:
        raise HostError(
            f"no Debian apt sources found in {etc_apt}",
            hint="configure Debian in /etc/apt/sources.list.d/debian.sources "
            "(as on any Debian install) and run `apt-get update`",
            etc_apt=str(etc_apt),
        )
    return render_deb822(chosen)
