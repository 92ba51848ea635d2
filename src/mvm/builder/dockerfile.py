"""Dockerfiles, the common subset, parsed into build steps (pure; no files are read here).

Supported: ``FROM`` (one stage), ``RUN``, ``COPY``/``ADD`` of local files, ``ENV``,
``ARG``, ``WORKDIR``, ``USER``, ``CMD``/``ENTRYPOINT``. Anything else is an error that
names its line, so a build never silently does less than the Dockerfile says.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from mvm.errors import ManifestError

#: Bounds: a Dockerfile is small text; refuse anything that is not.
MAX_BYTES = 256 * 1024
MAX_INSTRUCTIONS = 1000
SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "CMD", "ENTRYPOINT")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class DockerfileError(ManifestError):
    """A Dockerfile the builder cannot follow; ``line`` is 1-based."""


@dataclass(frozen=True)
class Step:
    """One build step, in the order it runs. ``kind`` is run, copy, env, workdir or user."""

    kind: str
    line: int
    #: run: argv (exec form) or ["/bin/sh", "-c", text]; copy: [*sources, dest].
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    chown: str | None = None


@dataclass(frozen=True)
class Dockerfile:
    base: str
    base_line: int
    steps: tuple[Step, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()

    @property
    def default_command(self) -> tuple[str, ...]:
        return (*self.entrypoint, *self.cmd)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join ``\\`` continuations, drop comments and blank lines; keep the first line number."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") and not buf:
            continue
        if not buf:
            start = n
            if not stripped:
                continue
        if stripped.startswith("#"):
            continue  # a comment inside a continuation is skipped, as docker does
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(stripped)
        out.append((start, " ".join(b for b in buf if b).strip()))
        buf = []
    if buf:
        out.append((start, " ".join(b for b in buf if b).strip()))
    return out


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}``; unknown names become empty, as in docker."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        value = variables.get(name, "")
        if m.group(1) and m.group(2) is not None and not value:
            return m.group(2)
        return value

    return _VAR.sub(one, text)


def _json_form(rest: str) -> list[str] | None:
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _command(rest: str) -> tuple[str, ...]:
    form = _json_form(rest)
    if form is not None:
        return tuple(form)
    return ("/bin/sh", "-c", rest)


def _pairs(rest: str, line: int, what: str) -> list[tuple[str, str]]:
    """``K=V K2="v 2"`` or the legacy ``K value with spaces``."""
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise DockerfileError(f"line {line}: {what}: {exc}", line=line) from None
    if not words:
        raise DockerfileError(f"line {line}: {what} needs a name", line=line)
    if "=" not in words[0]:
        name, _, value = rest.partition(" ")
        pairs = [(name, value.strip())]
    else:
        pairs = []
        for w in words:
            name, eq, value = w.partition("=")
            if not eq:
                raise DockerfileError(
                    f"line {line}: {what}: expected NAME=VALUE, got {w!r}", line=line
                )
            pairs.append((name, value))
    for name, _ in pairs:
        if not _NAME.match(name):
            raise DockerfileError(f"line {line}: {what}: invalid name {name!r}", line=line)
    return pairs


def _copy(keyword: str, rest: str, line: int, variables: dict[str, str]) -> Step:
    chown = None
    words = _json_form(rest)
    if words is None:
        try:
            words = shlex.split(rest)
        except ValueError as exc:
            raise DockerfileError(f"line {line}: {keyword}: {exc}", line=line) from None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--chown="):
            chown = substitute(flag.removeprefix("--chown="), variables)
        else:
            raise DockerfileError(
                f"line {line}: {keyword} {flag.split('=')[0]} is not supported",
                hint="copy from the build directory only",
                line=line,
            )
    words = [substitute(w, variables) for w in words]
    if len(words) < 2:
        raise DockerfileError(f"line {line}: {keyword} needs a source and a destination", line=line)
    for src in words[:-1]:
        if re.match(r"^[a-z][a-z0-9+.-]*://", src) or src.startswith("git@"):
            raise DockerfileError(
                f"line {line}: {keyword} {src}: only local files can be copied",
                hint="download inside a RUN step (through the egress policy) instead",
                line=line,
            )
    return Step("copy", line, tuple(words), chown=chown)


def parse(text: str) -> Dockerfile:
    """Parse a Dockerfile; raise ``DockerfileError`` naming the first line it cannot follow."""
    if len(text.encode()) > MAX_BYTES:
        raise DockerfileError(f"the Dockerfile is larger than {MAX_BYTES} bytes")
    lines = _logical_lines(text)
    if len(lines) > MAX_INSTRUCTIONS:
        raise DockerfileError(f"more than {MAX_INSTRUCTIONS} instructions")
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    base: str | None = None
    base_line = 0
    steps: list[Step] = []
    workdir, user = "/", "root"
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    for line, content in lines:
        keyword, _, rest = content.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword not in SUPPORTED:
            raise DockerfileError(
                f"line {line}: {keyword} is not supported",
                hint=f"supported instructions: {', '.join(SUPPORTED)}",
                line=line,
            )
        variables = {**args, **env}
        if keyword == "ARG":
            for name, value in _pairs(rest, line, "ARG") if "=" in rest else [(rest, "")]:
                if not _NAME.match(name):
                    raise DockerfileError(f"line {line}: ARG: invalid name {name!r}", line=line)
                args.setdefault(name, substitute(value, variables))
            continue
        if keyword == "FROM":
            if base is not None:
                raise DockerfileError(
                    f"line {line}: a second FROM: multi-stage builds are not supported", line=line
                )
            words = rest.split()
            if len(words) == 3 and words[1].upper() == "AS":
                words = words[:1]
            if len(words) != 1 or words[0].startswith("--"):
                raise DockerfileError(f"line {line}: FROM takes one image name", line=line)
            base, base_line = substitute(words[0], args), line
            continue
        if base is None:
            raise DockerfileError(f"line {line}: {keyword} before FROM", line=line)
        if not rest:
            raise DockerfileError(f"line {line}: {keyword} needs an argument", line=line)
        if keyword == "RUN":
            steps.append(Step("run", line, _command(rest), env=tuple(sorted(env.items()))))
        elif keyword in ("COPY", "ADD"):
            steps.append(_copy(keyword, rest, line, variables))
        elif keyword == "ENV":
            for name, value in _pairs(rest, line, "ENV"):
                env[name] = substitute(value, variables)
                steps.append(Step("env", line, (name, env[name])))
        elif keyword == "WORKDIR":
            path = substitute(rest, variables)
            workdir = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
            steps.append(Step("workdir", line, (workdir,)))
        elif keyword == "USER":
            user = substitute(rest, variables)
            steps.append(Step("user", line, (user,)))
        elif keyword == "CMD":
            cmd = _command(rest)
        else:
            entrypoint = _command(rest)
    if base is None:
        raise DockerfileError(
            "the Dockerfile has no FROM", hint="start it with e.g. FROM debian:bookworm"
        )
    return Dockerfile(base, base_line, tuple(steps), env, workdir, user, cmd, entrypoint)
