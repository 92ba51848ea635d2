"""E2B's directory watching (``files.watch_dir``) over mvm's file listing.

mvm's guest agent has no inotify verb, so a watch is a poll: the directory (with
``recursive``, its tree, bounded) is listed through mvmd and compared with the last
listing. New entries are ``CREATE``, gone ones ``REMOVE``, a changed size or mtime
``WRITE``, a changed mode ``CHMOD``; a rename shows as ``REMOVE`` + ``CREATE`` and
changes undone between two polls are not seen. Event names are relative to the
watched directory, as envd's.

- ``filesystem.Filesystem/WatchDir`` (the async SDK): a stream, ``start``, then events
  as the polls find them, a ``keepalive`` now and then, until the client goes.
- ``CreateWatcher`` / ``GetWatcherEvents`` / ``RemoveWatcher`` (the sync SDK): a watcher
  kept by this server, polled when the SDK asks for its events.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from mvm import errors
from mvm.api import models as M
from mvm.e2b import connect as C
from mvm.e2b.envd import RpcError, rpc_error
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity

#: Seconds between two listings of a watched directory (a stream).
POLL: Final = 0.5
#: Seconds between keepalive events on a quiet stream.
KEEPALIVE: Final = 15.0
#: Most entries one watch compares (a bigger tree is cut, not an error).
MAX_ENTRIES: Final = 5_000
#: Deepest recursion of a recursive watch.
MAX_DEPTH: Final = 8
#: Watchers (sync SDK) per tenant, and how long an unpolled one is kept.
MAX_WATCHERS: Final = 64
IDLE: Final = 600.0

Listing = dict[str, tuple[str, int, float, int]]  # relpath -> (type, size, mtime, mode)


async def listing(up: Upstream, ident: Identity, name: str, root: str, recursive: bool) -> Listing:
    """The entries under ``root`` (relative paths), breadth first, bounded."""
    root = root.rstrip("/") or "/"
    out: Listing = {}
    todo = [("", 1)]
    while todo and len(out) < MAX_ENTRIES:
        rel, level = todo.pop(0)
        path = f"{root.rstrip('/')}/{rel}" if rel else root
        try:
            entries = await up.typed(
                list[M.FileEntry],
                ident,
                "GET",
                f"/sandboxes/{name}/files/list",
                params={"path": path},
            )
        except errors.MvmError:
            if not rel:
                raise  # the watched directory itself is gone or not one
            continue  # a subdirectory removed meanwhile
        for e in entries:
            sub = f"{rel}/{e.name}" if rel else e.name
            out[sub] = (e.type, e.size, e.mtime, e.mode)
            if recursive and e.type == "dir" and level < MAX_DEPTH:
                todo.append((sub, level + 1))
    return out


def diff(old: Listing, new: Listing) -> list[dict[str, Any]]:
    """envd ``FilesystemEvent`` messages for the change from ``old`` to ``new``."""
    events: list[dict[str, Any]] = []
    for path in sorted(new.keys() - old.keys()):
        events.append({"name": path, "type": "EVENT_TYPE_CREATE"})
    for path in sorted(old.keys() & new.keys()):
        (t0, s0, m0, mode0), (t1, s1, m1, mode1) = old[path], new[path]
        if t0 != t1:
            events.append({"name": path, "type": "EVENT_TYPE_REMOVE"})
            events.append({"name": path, "type": "EVENT_TYPE_CREATE"})
            continue
        if t1 != "dir" and (s0, m0) != (s1, m1):
            events.append({"name": path, "type": "EVENT_TYPE_WRITE"})
        if mode0 != mode1:
            events.append({"name": path, "type": "EVENT_TYPE_CHMOD"})
    for path in sorted(old.keys() - new.keys()):
        events.append({"name": path, "type": "EVENT_TYPE_REMOVE"})
    return events


def _request(body: dict[str, Any]) -> tuple[str, bool]:
    path = body.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise errors.InvalidArgument("path must be an absolute directory path")
    if body.get("includeEntry") or body.get("allowNetworkMounts"):
        raise errors.InvalidArgument("includeEntry and allowNetworkMounts are not supported")
    return path, bool(body.get("recursive", False))


@dataclass
class Watcher:
    tenant: str
    sandbox: str
    path: str
    recursive: bool
    seen: Listing
    used: float = field(default_factory=time.monotonic)


class Watches:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream
        self.watchers: dict[str, Watcher] = {}

    async def stream(
        self,
        ident: Identity,
        name: str,
        body: dict[str, Any],
        resp: web.StreamResponse,
        *,
        prepare: web.Request,
    ) -> None:
        """WatchDir: until the client goes away (a write fails) or the sandbox does. A bad
        request or a missing directory is refused before the stream starts."""
        path, recursive = _request(body)
        seen = await listing(self.up, ident, name, path, recursive)
        await resp.prepare(prepare)
        await resp.write(C.encode({"start": {}}))
        quiet_since = time.monotonic()
        while True:
            await asyncio.sleep(POLL)
            try:
                now = await listing(self.up, ident, name, path, recursive)
            except errors.MvmError as exc:
                err = rpc_error(ident, exc)
                await resp.write(C.end_frame(err.code, err.message))
                return
            events = diff(seen, now)
            seen = now
            for ev in events:
                await resp.write(C.encode({"filesystem": ev}))
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE:
                await resp.write(C.encode({"keepalive": {}}))
                quiet_since = time.monotonic()

    async def unary(self, ident: Identity, name: str, method: str, body: dict[str, Any]) -> Any:
        self._expire()
        if method == "CreateWatcher":
            path, recursive = _request(body)
            mine = sum(1 for w in self.watchers.values() if w.tenant == ident.tenant)
            if mine >= MAX_WATCHERS:
                raise errors.InvalidArgument(
                    f"at most {MAX_WATCHERS} watchers at once", hint="stop some first"
                )
            seen = await listing(self.up, ident, name, path, recursive)
            new_id = "w-" + secrets.token_hex(8)
            self.watchers[new_id] = Watcher(ident.tenant, name, path, recursive, seen)
            return {"watcherId": new_id}
        wid = str(body.get("watcherId") or body.get("watcher_id") or "")
        w = self.watchers.get(wid)
        if w is None or w.tenant != ident.tenant or w.sandbox != name:
            raise RpcError("not_found", f"watcher {wid[:40]} not found")
        if method == "RemoveWatcher":
            del self.watchers[wid]
            return {}
        now = await listing(self.up, ident, name, w.path, w.recursive)
        events, w.seen, w.used = diff(w.seen, now), now, time.monotonic()
        return {"events": events}

    def _expire(self) -> None:
        cut = time.monotonic() - IDLE
        for wid in [k for k, w in self.watchers.items() if w.used < cut]:
            del self.watchers[wid]
