"""mvmd's HTTP API (aiohttp on a Unix socket). Routing and (de)serialisation only: parse,
call the sandbox service (``mvm.service``), encode. No agent calls, no audit, no policy.

Malformed requests get a 400 with a JSON ErrorBody; every MvmError maps to a
status code; nothing a client sends can take the daemon down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from mvm import errors, names, redact
from mvm.api import models as M
from mvm.service import SandboxService, info

log = logging.getLogger(__name__)
#: Longest a request waits for mvmd to finish reattaching after a restart (seconds).
READY_TIMEOUT = 90.0
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(exc: errors.MvmError) -> M.ErrorBody:
    """The JSON form of an error, with every secret value mvmd handed out redacted."""
    r = redact.known.current()
    data: dict[str, object] = {
        k: r.redact_text(v) if isinstance(v, str) else v
        for k, v in exc.data.items()
        if isinstance(v, (str, int, float, bool))
    }
    hint = r.redact_text(exc.hint) if exc.hint else exc.hint
    return M.ErrorBody(
        error=type(exc).__name__, message=r.redact_text(exc.message), hint=hint, data=data
    )


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def http_error_body(status: int, reason: str, request: web.Request) -> M.ErrorBody:
    """aiohttp's own refusals (no such route, wrong method, body too large) as the same
    JSON error body as every other error, so clients never have to parse text."""
    hints = {
        404: "see docs/cli.md for the API routes",
        405: "see docs/cli.md for the API routes",
        413: f"request bodies are limited to {M.MAX_BODY} bytes; send big files in parts",
    }
    method = request.method if request.method.isalpha() else "?"
    path = request.path.replace("\x00", "\\x00")[:200]
    return M.ErrorBody(
        error="InvalidArgument",
        message=f"HTTP {status} {reason}: {method} {path}",
        hint=hints.get(status),
        data={"status": status},
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.MvmError as exc:
        return json_response(error_body(exc), errors.http_status(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(http_error_body(exc.status, exc.reason, request), exc.status)
    except Exception as exc:  # a bug: report it, keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        body = M.ErrorBody(
            error="MvmError",
            message=redact.known.current().redact_text(
                f"internal error: {exc.__class__.__name__}: {exc}"
            ),
        )
        return json_response(body, 500)


async def body_as(request: web.Request, typ: type[T]) -> T:
    raw = await request.read()
    try:
        return msgspec.json.decode(raw, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise errors.InvalidArgument(f"bad request body: {exc}") from None


def q_str(request: web.Request, key: str) -> str:
    v = request.query.get(key)
    if v is None or v == "":
        raise errors.InvalidArgument(f"missing query parameter {key!r}")
    if "\x00" in v:
        raise errors.InvalidArgument(f"{key!r} contains a NUL byte")
    return v


def q_float(request: web.Request, key: str, default: float) -> float:
    v = request.query.get(key)
    if v is None:
        return default
    try:
        f = float(v)
    except ValueError:
        raise errors.InvalidArgument(f"{key!r} must be a number") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise errors.InvalidArgument(f"{key!r} must be finite")
    return f


def q_int(request: web.Request, key: str, default: int) -> int:
    v = request.query.get(key)
    if v is None:
        return default
    try:
        return int(v, 0)
    except ValueError:
        raise errors.InvalidArgument(f"{key!r} must be an integer") from None


def q_flag(request: web.Request, key: str) -> bool:
    """A 0/1 query flag (``true``/``false`` too); anything else is a clear 400."""
    v = request.query.get(key)
    if v is None:
        return False
    flag = {"0": False, "1": True, "false": False, "true": True}.get(v.lower())
    if flag is None:
        raise errors.InvalidArgument(f"{key!r} must be 0 or 1")
    return flag


class Api:
    def __init__(
        self, service: SandboxService, socket: str, on_shutdown: Callable[[], None]
    ) -> None:
        self.s = service
        self.socket = socket
        self.started = time.time()
        self.on_shutdown = on_shutdown

    @web.middleware
    async def ready_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """mvmd serves its socket while it reattaches to running sandboxes (a stalling guest
        can take that long): ``status`` answers at once, everything else waits, bounded."""
        if not self.s.ready.is_set() and request.path != f"/{M.API_VERSION}/status":
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await self.s.ready.wait()
            except TimeoutError:
                raise errors.MvmError(
                    f"mvmd is still reattaching to its sandboxes after {READY_TIMEOUT:.0f}s",
                    hint="retry in a moment; see $MVM_HOME/mvmd.log",
                ) from None
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[errors_middleware, self.ready_middleware],
            client_max_size=M.MAX_BODY + 1024,
        )
        r = app.router
        v = f"/{M.API_VERSION}"
        r.add_get(f"{v}/status", self.status)
        r.add_post(f"{v}/shutdown", self.shutdown)
        r.add_get(f"{v}/sandboxes", self.list)
        r.add_post(f"{v}/sandboxes", self.create)
        s = f"{v}/sandboxes/{{name}}"
        r.add_get(s, self.get)
        r.add_delete(s, self.down)
        r.add_post(f"{s}/pause", self.pause)
        r.add_post(f"{s}/resume", self.resume)
        r.add_post(f"{s}/ttl", self.ttl)
        r.add_post(f"{s}/wait", self.wait)
        r.add_post(f"{s}/exec", self.exec)
        r.add_get(f"{s}/files", self.read_file)
        r.add_put(f"{s}/files", self.write_file)
        r.add_delete(f"{s}/files", self.remove)
        r.add_get(f"{s}/files/list", self.list_dir)
        r.add_post(f"{s}/uploads", self.uploads)
        r.add_get(f"{s}/files/stat", self.stat)
        r.add_post(f"{s}/files/mkdir", self.mkdir)
        r.add_post(f"{s}/files/move", self.move)
        r.add_get(f"{s}/procs", self.proc_list)
        r.add_post(f"{s}/procs", self.proc_start)
        r.add_post(f"{s}/procs/{{proc}}/wait", self.proc_wait)
        r.add_post(f"{s}/procs/{{proc}}/signal", self.proc_signal)
        r.add_post(f"{s}/procs/{{proc}}/stdin", self.proc_stdin)
        r.add_get(f"{s}/procs/{{proc}}/output", self.proc_output)
        r.add_get(f"{s}/logs", self.logs)
        r.add_get(f"{s}/forwards", self.forward_list)
        r.add_post(f"{s}/forwards", self.forward_add)
        r.add_delete(f"{s}/forwards/{{forward}}", self.forward_remove)
        r.add_get(f"{s}/snapshots", self.snapshot_list)
        r.add_post(f"{s}/snapshots", self.snapshot_save)
        r.add_post(f"{s}/snapshots/{{snap}}/restore", self.snapshot_restore)
        r.add_delete(f"{s}/snapshots/{{snap}}", self.snapshot_remove)
        r.add_post(f"{v}/calls", self.note_call)
        r.add_post(f"{s}/calls", self.note_call)
        from mvm.daemon import fork_routes

        fork_routes.add_routes(r, s, self.s)
        from mvm.daemon import migrate_routes

        migrate_routes.add_routes(r, s, self.s)

        from mvm.daemon import builder_routes

        builder_routes.add_routes(r, v, self.s)
        return app

    # -- daemon -----------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        from importlib.metadata import version

        return json_response(
            M.DaemonStatus(
                pid=os.getpid(),
                version=version("mvm"),
                started=self.started,
                sandboxes=len(self.s.core.live),
                socket=self.socket,
                pool=self.s.pool.status(),
            )
        )

    async def note_call(self, request: web.Request) -> web.Response:
        note = await body_as(request, M.CallNote)
        sandbox = name(request) if "name" in request.match_info else None
        return json_response(M.Noted(audit_id=self.s.note_call(note, sandbox)), 201)

    async def shutdown(self, request: web.Request) -> web.Response:
        self.on_shutdown()
        return json_response({"ok": True})

    # -- sandboxes ----------------------------------------------------------------------
    async def list(self, request: web.Request) -> web.Response:
        return json_response(self.s.sandboxes.list_all())

    async def create(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.CreateSandbox)
        live = await self.s.sandboxes.create(req)
        return json_response(info(live), 201)

    async def get(self, request: web.Request) -> web.Response:
        return json_response(info(self.s.core.get(name(request))))

    async def down(self, request: web.Request) -> web.Response:
        return json_response(await self.s.sandboxes.down(name(request)))

    async def pause(self, request: web.Request) -> web.Response:
        return json_response(info(await self.s.sandboxes.pause(name(request))))

    async def resume(self, request: web.Request) -> web.Response:
        return json_response(info(await self.s.sandboxes.resume(name(request))))

    async def ttl(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.TtlRequest)
        return json_response(info(self.s.sandboxes.set_ttl(name(request), req.ttl_seconds)))

    async def wait(self, request: web.Request) -> web.Response:
        timeout = q_float(request, "timeout", 60.0)
        return json_response(await self.s.sandboxes.wait(name(request), timeout))

    # -- exec ---------------------------------------------------------------------------
    async def exec(self, request: web.Request) -> web.StreamResponse:
        """Refusals come as plain error answers; once the stream has started, an error
        ends it with a final ``error`` event (never an HTTP answer inside a chunk)."""
        req = await body_as(request, M.ExecRequest)
        sb = name(request)
        self.s.execs.prepare(sb, req)
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            async for event in self.s.execs.stream(sb, req):
                await resp.write(msgspec.json.encode(event) + b"\n")
        except errors.MvmError as exc:
            err = M.ExecEvent(type="error", error=error_body(exc))
            await resp.write(msgspec.json.encode(err) + b"\n")
        except Exception as exc:  # a bug: still end the stream with an error event
            log.exception("exec stream of %s failed", sb)
            body = M.ErrorBody(error="MvmError", message=f"internal error: {type(exc).__name__}")
            await resp.write(msgspec.json.encode(M.ExecEvent(type="error", error=body)) + b"\n")
        await resp.write_eof()
        return resp

    # -- files --------------------------------------------------------------------------
    async def read_file(self, request: web.Request) -> web.Response:
        data = await self.s.files.read(name(request), q_str(request, "path"))
        return web.Response(body=data, content_type="application/octet-stream")

    async def write_file(self, request: web.Request) -> web.Response:
        path, mode = q_str(request, "path"), q_int(request, "mode", 0o644)
        data = await request.read()
        return json_response(await self.s.files.write(name(request), path, data, mode))

    async def remove(self, request: web.Request) -> web.Response:
        path, recursive = q_str(request, "path"), bool(q_int(request, "recursive", 0))
        aid = await self.s.files.remove(name(request), path, recursive)
        return json_response({"ok": True, "audit_id": aid})

    async def list_dir(self, request: web.Request) -> web.Response:
        return json_response(await self.s.files.list_dir(name(request), q_str(request, "path")))

    async def stat(self, request: web.Request) -> web.Response:
        return json_response(await self.s.files.stat(name(request), q_str(request, "path")))

    async def mkdir(self, request: web.Request) -> web.Response:
        path, parents = q_str(request, "path"), bool(q_int(request, "parents", 0))
        aid = await self.s.files.mkdir(name(request), path, parents)
        return json_response({"ok": True, "audit_id": aid})

    async def move(self, request: web.Request) -> web.Response:
        path, dest = q_str(request, "path"), q_str(request, "dest")
        aid = await self.s.files.move(name(request), path, dest)
        return json_response({"ok": True, "audit_id": aid})

    async def uploads(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.UploadCheck)
        self.s.files.uploads(name(request), req.paths)
        return json_response({"ok": True})

    # -- processes ------------------------------------------------------------------------
    async def proc_start(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.ProcStart)
        return json_response(await self.s.procs.start(name(request), req), 201)

    async def proc_list(self, request: web.Request) -> web.Response:
        return json_response(await self.s.procs.all(name(request)))

    async def proc_wait(self, request: web.Request) -> web.Response:
        timeout = q_float(request, "timeout", 30.0)
        return json_response(await self.s.procs.wait(name(request), proc(request), timeout))

    async def proc_signal(self, request: web.Request) -> web.Response:
        sig = q_int(request, "signal", 15)
        return json_response(await self.s.procs.signal(name(request), proc(request), sig))

    async def proc_stdin(self, request: web.Request) -> web.Response:
        data = await request.read()
        eof = bool(q_int(request, "eof", 0))
        await self.s.procs.stdin(name(request), proc(request), data, eof)
        return json_response({"ok": True})

    async def proc_output(self, request: web.Request) -> web.Response:
        stream = request.query.get("stream", "stdout")
        body = await self.s.procs.output(name(request), proc(request), stream)
        return web.Response(body=body, content_type="application/octet-stream")

    # -- port forwards ---------------------------------------------------------------------
    async def forward_add(self, request: web.Request) -> web.Response:
        spec = await body_as(request, M.PortSpec)
        return json_response(await self.s.ports.add(name(request), spec), 201)

    async def forward_list(self, request: web.Request) -> web.Response:
        return json_response(self.s.ports.all(name(request)))

    async def forward_remove(self, request: web.Request) -> web.Response:
        fid = request.match_info["forward"]
        return json_response(await self.s.ports.remove(name(request), fid))

    # -- logs -----------------------------------------------------------------------------
    async def logs(self, request: web.Request) -> web.StreamResponse:
        live = self.s.core.get(name(request))
        follow = q_flag(request, "follow")
        since = request.query.get("since")
        since_f = q_float(request, "since", 0.0) if since is not None else None
        book = live.logbook
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        if book is not None:
            async for ev in book.read(follow=follow, since=since_f):
                await resp.write(msgspec.json.encode(ev) + b"\n")
        await resp.write_eof()
        return resp

    # -- snapshots ------------------------------------------------------------------------
    async def snapshot_list(self, request: web.Request) -> web.Response:
        return json_response(self.s.snapshots.all(name(request)))

    async def snapshot_save(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.SnapshotRequest)
        return json_response(await self.s.snapshots.save(name(request), req.name), 201)

    async def snapshot_restore(self, request: web.Request) -> web.Response:
        snap = request.match_info["snap"]
        return json_response(await self.s.snapshots.restore(name(request), snap))

    async def snapshot_remove(self, request: web.Request) -> web.Response:
        aid = await self.s.snapshots.remove(name(request), request.match_info["snap"])
        return json_response({"ok": True, "audit_id": aid})


def name(request: web.Request) -> str:
    """The sandbox name of a route, checked by the one name rule."""
    return names.check("sandbox", request.match_info["name"])


def proc(request: web.Request) -> int:
    try:
        return int(request.match_info["proc"])
    except ValueError:
        raise errors.InvalidArgument("process id must be an integer") from None
