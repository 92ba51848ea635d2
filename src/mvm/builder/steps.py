"""Build steps from ``mvm.toml``'s ``[build]`` table, and the build context both it and
Dockerfiles copy from: files inside the project directory only, bounded.

    [build]
    files = ["requirements.txt", "src/"]   # copied to workdir
    run = ["pip install -r requirements.txt"]
    env = { PIP_NO_CACHE_DIR = "1" }
    workdir = "/app"
    user = "root"

The context is packed here into a deterministic tar (fixed owner and mtime) that the
builder VM reads from a read-only disk; nothing in it is interpreted on the host.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mvm.builder.dockerfile import Step
from mvm.errors import InvalidArgument, ManifestError

MAX_FILES = 5000
MAX_CONTEXT_BYTES = 512 * 1024 * 1024
MAX_RUN_STEPS = 100
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$|^[0-9]{1,9}(:[0-9]{1,9})?$")


class BuildSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    run: list[str] = []
    files: list[str] = []
    env: dict[str, str] = {}
    workdir: str = "/work"
    user: str = "root"
    #: Hosts (host[:port]) the build may reach besides the ``registries`` preset; the host's
    #: policy (allowed_hosts) still decides, as for any sandbox's allowlist.
    allow: list[str] = []


def parse_section(text: str, origin: str) -> BuildSection | None:
    """The ``[build]`` table of an ``mvm.toml``, validated; None when there is none."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from None
    if "build" not in raw:
        return None
    try:
        sec = msgspec.convert(raw["build"], BuildSection)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{origin}: [build]: {exc}") from None
    if len(sec.run) > MAX_RUN_STEPS:
        raise ManifestError(f"{origin}: [build] has more than {MAX_RUN_STEPS} run steps")
    for k in sec.env:
        if not _NAME.match(k):
            raise ManifestError(f"{origin}: [build] env: invalid variable name {k!r}")
    if not sec.workdir.startswith("/") or "\0" in sec.workdir:
        raise ManifestError(f"{origin}: [build] workdir must be an absolute path")
    if not _USER.match(sec.user):
        raise ManifestError(f"{origin}: [build] user {sec.user!r} is not a user name or uid")
    for f in sec.files:
        relative_source(f, origin)
    check_allow(sec.allow, f"{origin}: [build] allow")
    return sec


MAX_ALLOW = 64


def check_allow(entries: list[str], origin: str) -> list[str]:
    """Extra egress entries of a build, by the allowlist's own rule
    (``policy.network.parse_pattern``), bounded; admission holds them to the host's policy
    when the builder sandbox is created."""
    from mvm.policy.network import parse_pattern

    if len(entries) > MAX_ALLOW:
        raise ManifestError(f"{origin}: more than {MAX_ALLOW} entries")
    for e in entries:
        try:
            parse_pattern(e)
        except InvalidArgument as exc:
            raise ManifestError(f"{origin}: {e[:80]!r} is not host[:port]: {exc}") from None
    return list(entries)


def relative_source(src: str, origin: str) -> str:
    """A source path as written by the user, checked to stay inside the project directory."""
    norm = posixpath.normpath(src) if src else ""
    if not src or "\0" in src or src.startswith("/") or norm == ".." or norm.startswith("../"):
        raise ManifestError(
            f"{origin}: {src!r} is not a path inside the project directory",
            hint="name files relative to the project directory, without '..'",
        )
    return norm


def steps_from_section(sec: BuildSection) -> list[Step]:
    """The section as the same steps a Dockerfile gives (one executor runs both)."""
    steps: list[Step] = [Step("env", 0, (k, v)) for k, v in sorted(sec.env.items())]
    steps.append(Step("workdir", 0, (sec.workdir,)))
    if sec.files:
        steps.append(Step("copy", 0, (*sec.files, sec.workdir.rstrip("/") + "/")))
    steps.append(Step("user", 0, (sec.user,)))
    env = tuple(sorted(sec.env.items()))
    steps += [Step("run", 0, ("/bin/sh", "-c", cmd), env=env) for cmd in sec.run]
    return steps


@dataclass(frozen=True)
class ContextFile:
    local: Path
    name: str  # path inside the context tar: the relative source path


def collect(project: Path, sources: list[str], origin: str) -> list[ContextFile]:
    """Every file the sources name, inside ``project`` (links must not leave it), bounded."""
    root = project.resolve()
    out: dict[str, ContextFile] = {}
    total = 0
    for src in sources:
        rel = relative_source(src, origin)
        path = (root / rel).resolve()
        if path != root and root not in path.parents:
            raise ManifestError(f"{origin}: {src!r} leads outside the project directory")
        if not path.exists():
            raise ManifestError(f"{origin}: {src!r} does not exist in {project}")
        walk = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
        for p in walk:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = p.resolve()
                if target != root and root not in target.parents:
                    raise ManifestError(f"{origin}: {p} is a link leading outside the project")
                continue  # links are not copied: their targets are, when named
            if not stat.S_ISREG(st.st_mode):
                continue
            name = p.relative_to(root).as_posix()
            total += st.st_size
            out[name] = ContextFile(p, name)
            if len(out) > MAX_FILES or total > MAX_CONTEXT_BYTES:
                raise ManifestError(
                    f"{origin}: the build context is over {MAX_FILES} files or "
                    f"{MAX_CONTEXT_BYTES >> 20} MiB"
                )
    return [out[k] for k in sorted(out)]


def write_context_tar(files: list[ContextFile], mtime: int, out: Path) -> None:
    """A deterministic tar of the context: sorted names, owner 0, fixed mtime, modes kept."""
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.name)
            info.size, info.mtime = f.local.stat().st_size, mtime
            info.mode = 0o755 if os.access(f.local, os.X_OK) else 0o644
            with f.local.open("rb") as fh:
                tar.addfile(info, fh)
