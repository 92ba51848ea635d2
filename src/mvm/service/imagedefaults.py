"""An image's own run defaults, applied to the commands of a sandbox booted from it.

Images made by the builder (OCI imports, Dockerfiles) record the source's ``Cmd``,
``Entrypoint``, ``User`` and ``WorkingDir`` (``Image.build["config"]``). A command with no
argv runs the image's entrypoint + cmd; a command with no user or cwd runs as the image's
user in its working directory. What the caller states always wins, and an image that
names no user keeps mvm's default (the unprivileged ``user``, not root as Docker would).
The record is read once per image id (ids are content hashes, so a cached entry never
goes stale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError
from mvm.service.core import Core
from mvm.service.live import Live

_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
_MAX_ARGS = 256
_MAX_ARG = 4096


@dataclass(frozen=True)
class Defaults:
    argv: tuple[str, ...] = ()
    user: str | None = None
    cwd: str | None = None


def from_build(build: dict[str, Any]) -> Defaults:
    """The defaults of an image record's ``build`` field, bounded (the field came from a
    builder VM, through ``vmrun.clean_config``; it is still checked here)."""
    cfg = build.get("config") if isinstance(build, dict) else None
    if not isinstance(cfg, dict):
        return Defaults()

    def words(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list):
            return ()
        return tuple(x for x in v[:_MAX_ARGS] if isinstance(x, str) and 0 < len(x) <= _MAX_ARG)

    user = cfg.get("user")
    cwd = cfg.get("workdir")
    return Defaults(
        argv=(*words(cfg.get("entrypoint")), *words(cfg.get("cmd"))),
        user=user if isinstance(user, str) and _USER.match(user) else None,
        cwd=cwd if isinstance(cwd, str) and cwd.startswith("/") and len(cwd) <= 1024 else None,
    )


R = TypeVar("R", M.ExecRequest, M.ProcStart)


class ImageDefaults:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._by_image: dict[str, Defaults] = {}

    def of(self, live: Live) -> Defaults:
        d = self._by_image.get(live.rec.image_id)
        if d is None:
            try:
                d = from_build(self.core.image_for(live.rec).build)
            except MvmError:  # the record is gone: the sandbox runs on, with mvm's defaults
                return Defaults()
            self._by_image[live.rec.image_id] = d
        return d

    def apply(self, live: Live, req: R) -> R:
        """``req`` with what it leaves unset taken from the image (unchanged otherwise)."""
        if req.argv and req.user is not None and req.cwd is not None:
            return req
        d = self.of(live)
        argv = req.argv or list(d.argv)
        if not argv:
            raise InvalidArgument(
                f"no command given, and image {live.rec.image!r} records no CMD or ENTRYPOINT",
                hint="pass a command",
            )
        return msgspec.structs.replace(
            req,
            argv=argv,
            user=req.user if req.user is not None else d.user,
            cwd=req.cwd if req.cwd is not None else d.cwd,
        )
