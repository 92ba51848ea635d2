"""mvmd's HTTP API (aiohttp on a Unix socket). Thin: parse, call the Manager, encode.

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

from mvm import audit, errors, redact
from mvm.api import models as M
from mvm.daemon.manager import Manager, audit_after, info
from mvm.state import SnapshotRecord

log = logging.getLogger(__name__)
#: Longest a request waits for mvmd to finish reattaching after a restart (seconds).
READY_TIMEOUT = 90.0
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS: dict[type[errors.MvmError], int] = {
    errors.InvalidArgument: 400,
    errors.SandboxNotFound: 404,
    errors.SnapshotNotFound: 404,
    errors.ForwardNotFound: 404,
    errors.ImageNotFound: 404,
    errors.UnknownPreset: 404,
    errors.SandboxExists: 409,
    errors.SnapshotExists: 409,
    errors.SandboxStateError: 409,
    errors.PolicyDenied: 403,
    errors.CommandTimeout: 504,
    errors.VMError: 502,
}
AGENT_STATUS = {
    "not_found": 404,
    "exists": 409,
    "too_large": 413,
    "bad_request": 400,
    "permission_denied": 403,
    "is_a_directory": 400,
    "not_a_directory": 400,
    "not_empty": 409,
    "no_space": 507,
}


def status_for(exc: errors.MvmError) -> int:
    if isinstance(exc, errors.AgentError):
        return AGENT_STATUS.get(str(exc.data.get("code")), 400)
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


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
        return json_response(error_body(exc), status_for(exc))
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


def snap_info(s: SnapshotRecord, audit_id: str | None = None) -> M.SnapshotInfo:
    return M.SnapshotInfo(
        sandbox=s.sandbox,
        name=s.name,
        created=s.created,
        size=s.size,
        image=s.image,
        audit_id=audit_id,
    )


class Api:
    def __init__(self, manager: Manager, socket: str, on_shutdown: Callable[[], None]) -> None:
        self.m = manager
        self.socket = socket
        self.started = time.time()
        self.on_shutdown = on_shutdown

    @web.middleware
    async def ready_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """mvmd serves its socket while it reattaches to running sandboxes (a stalling guest
        can take that long): ``status`` answers at once, everything else waits, bounded."""
        if not self.m.ready.is_set() and request.path != f"/{M.API_VERSION}/status":
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await self.m.ready.wait()
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
        return app

    # -- daemon -----------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        from importlib.metadata import version

        return json_response(
            M.DaemonStatus(
                pid=os.getpid(),
                version=version("mvm"),
                started=self.started,
                sandboxes=len(self.m.live),
                socket=self.socket,
            )
        )

    async def shutdown(self, request: web.Request) -> web.Response:
        self.on_shutdown()
        return json_response({"ok": True})

    # -- sandboxes ----------------------------------------------------------------------
    async def list(self, request: web.Request) -> web.Response:
        return json_response(self.m.list_all())

    async def create(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.CreateSandbox)
        live = await self.m.create(req)
        return json_response(info(live), 201)

    async def get(self, request: web.Request) -> web.Response:
        return json_response(info(self.m.get(request.match_info["name"])))

    async def down(self, request: web.Request) -> web.Response:
        return json_response(await self.m.down(request.match_info["name"]))

    async def pause(self, request: web.Request) -> web.Response:
        return json_response(info(await self.m.pause(request.match_info["name"])))

    async def resume(self, request: web.Request) -> web.Response:
        return json_response(info(await self.m.resume(request.match_info["name"])))

    async def ttl(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.TtlRequest)
        return json_response(info(self.m.set_ttl(request.match_info["name"], req.ttl_seconds)))

    async def wait(self, request: web.Request) -> web.Response:
        timeout = q_float(request, "timeout", 60.0)
        return json_response(await self.m.wait(request.match_info["name"], timeout))

    # -- exec ---------------------------------------------------------------------------
    async def exec(self, request: web.Request) -> web.StreamResponse:
        req = await body_as(request, M.ExecRequest)
        if not req.argv:
            raise errors.InvalidArgument("empty command")
        if not 0 < req.timeout <= M.MAX_TTL:
            raise errors.InvalidArgument("timeout must be positive and at most a week")
        name = request.match_info["name"]
        self.m.running(name)  # fail with a proper status before streaming starts
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            async for event in self.m.exec_stream(name, req):
                await resp.write(msgspec.json.encode(event) + b"\n")
        except errors.MvmError as exc:
            err = M.ExecEvent(type="error", error=error_body(exc))
            await resp.write(msgspec.json.encode(err) + b"\n")
        await resp.write_eof()
        return resp

    # -- files --------------------------------------------------------------------------
    def _agent(self, request: web.Request) -> Any:
        return self.m.running(request.match_info["name"])[1]

    async def read_file(self, request: web.Request) -> web.Response:
        data = await self._agent(request).read_file(q_str(request, "path"), limit=M.MAX_FILE_READ)
        return web.Response(body=data, content_type="application/octet-stream")

    async def write_file(self, request: web.Request) -> web.Response:
        agent = self._agent(request)
        path = q_str(request, "path")
        mode = q_int(request, "mode", 0o644)
        data = await request.read()
        await agent.write_file(path, data, mode=mode)
        aid = audit_after(
            "fs.write",
            request.match_info["name"],
            path=path,
            size=len(data),
            sha256=audit.sha256_hex(data),
            mode=mode,
        )
        st = await agent.stat(path)
        return json_response(
            M.FileStat(
                type=st.type,
                size=st.size,
                mode=st.mode,
                mtime=st.mtime,
                uid=st.uid,
                gid=st.gid,
                audit_id=aid,
            )
        )

    async def remove(self, request: web.Request) -> web.Response:
        path, recursive = q_str(request, "path"), bool(q_int(request, "recursive", 0))
        await self._agent(request).remove(path, recursive=recursive)
        aid = audit_after("fs.remove", request.match_info["name"], path=path, recursive=recursive)
        return json_response({"ok": True, "audit_id": aid})

    async def list_dir(self, request: web.Request) -> web.Response:
        entries = await self._agent(request).list_dir(q_str(request, "path"))
        return json_response(
            [
                M.FileEntry(name=e.name, type=e.type, size=e.size, mode=e.mode, mtime=e.mtime)
                for e in entries
            ]
        )

    async def stat(self, request: web.Request) -> web.Response:
        st = await self._agent(request).stat(q_str(request, "path"))
        return json_response(
            M.FileStat(
                type=st.type, size=st.size, mode=st.mode, mtime=st.mtime, uid=st.uid, gid=st.gid
            )
        )

    async def mkdir(self, request: web.Request) -> web.Response:
        path, parents = q_str(request, "path"), bool(q_int(request, "parents", 0))
        await self._agent(request).mkdir(path, parents=parents)
        aid = audit_after("fs.mkdir", request.match_info["name"], path=path, parents=parents)
        return json_response({"ok": True, "audit_id": aid})

    async def move(self, request: web.Request) -> web.Response:
        path, dest = q_str(request, "path"), q_str(request, "dest")
        await self._agent(request).move(path, dest)
        aid = audit_after("fs.move", request.match_info["name"], path=path, dest=dest)
        return json_response({"ok": True, "audit_id": aid})

    # -- processes ------------------------------------------------------------------------
    def _proc(self, request: web.Request) -> int:
        try:
            return int(request.match_info["proc"])
        except ValueError:
            raise errors.InvalidArgument("process id must be an integer") from None

    @staticmethod
    def _view(p: Any) -> M.ProcView:
        return msgspec.convert(msgspec.to_builtins(p), M.ProcView)

    async def proc_start(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.ProcStart)
        if not req.argv:
            raise errors.InvalidArgument("empty command")
        live, agent = self.m.running(request.match_info["name"])
        p = await agent.proc_start(
            req.argv,
            env=self.m.exec_env(live, req.env, req.secret_env),
            cwd=req.cwd,
            user=req.user,
            stdin=req.stdin,
            stdin_open=req.stdin_open,
        )
        view = self._view(p)
        view.audit_id = self.m.proc_started(live, view.proc, req.argv, [*live.rec.env, *req.env])
        return json_response(view, 201)

    async def proc_list(self, request: web.Request) -> web.Response:
        return json_response([self._view(p) for p in await self._agent(request).proc_list()])

    async def proc_wait(self, request: web.Request) -> web.Response:
        timeout = max(0.0, min(q_float(request, "timeout", 30.0), 3600.0))
        p = await self._agent(request).proc_wait(self._proc(request), timeout)
        return json_response(self._exited_view(request, p))

    async def proc_signal(self, request: web.Request) -> web.Response:
        sig = q_int(request, "signal", 15)
        if not 1 <= sig <= 64:
            raise errors.InvalidArgument("signal must be between 1 and 64")
        p = await self._agent(request).proc_signal(self._proc(request), sig)
        return json_response(self._exited_view(request, p))

    def _exited_view(self, request: web.Request, p: Any) -> M.ProcView:
        """The view, with the audit id of the exit record once the process has ended."""
        view = self._view(p)
        if not view.running:
            live = self.m.get(request.match_info["name"])
            view.audit_id = self.m.proc_exited(live, view.proc, view.exit_code, view.signal)
        return view

    async def proc_stdin(self, request: web.Request) -> web.Response:
        data = await request.read()
        agent = self._agent(request)
        view = memoryview(data)
        eof = bool(q_int(request, "eof", 0))
        from mvm.agent.protocol import MAX_PAYLOAD

        while len(view) > MAX_PAYLOAD:
            await agent.proc_stdin(self._proc(request), bytes(view[:MAX_PAYLOAD]))
            view = view[MAX_PAYLOAD:]
        await agent.proc_stdin(self._proc(request), bytes(view), eof=eof)
        return json_response({"ok": True})

    async def proc_output(self, request: web.Request) -> web.Response:
        stream = request.query.get("stream", "stdout")
        live, agent = self.m.running(request.match_info["name"])
        num = self._proc(request)
        out = bytearray()
        offset = 0
        while True:
            data, meta = await agent.proc_output(num, stream, offset)
            if not data:
                break
            out += data
            offset = meta.offset + len(data)
            if offset >= meta.end:
                break
        body = live.redactor.redact_bytes(bytes(out))
        return web.Response(body=body, content_type="application/octet-stream")

    # -- port forwards ---------------------------------------------------------------------
    async def forward_add(self, request: web.Request) -> web.Response:
        spec = await body_as(request, M.PortSpec)
        return json_response(await self.m.forward_add(request.match_info["name"], spec), 201)

    async def forward_list(self, request: web.Request) -> web.Response:
        return json_response(self.m.forward_list(request.match_info["name"]))

    async def forward_remove(self, request: web.Request) -> web.Response:
        name, fid = request.match_info["name"], request.match_info["forward"]
        return json_response(await self.m.forward_remove(name, fid))

    # -- logs -----------------------------------------------------------------------------
    async def logs(self, request: web.Request) -> web.StreamResponse:
        live = self.m.get(request.match_info["name"])
        follow = bool(q_int(request, "follow", 0))
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
        return json_response(
            [snap_info(s) for s in self.m.snapshot_list(request.match_info["name"])]
        )

    async def snapshot_save(self, request: web.Request) -> web.Response:
        req = await body_as(request, M.SnapshotRequest)
        s = await self.m.snapshot_save(request.match_info["name"], req.name)
        aid = audit_after("snapshot.saved", s.sandbox, snapshot=s.name, size=s.size, image=s.image)
        return json_response(snap_info(s, aid), 201)

    async def snapshot_restore(self, request: web.Request) -> web.Response:
        snap = request.match_info["snap"]
        live = await self.m.snapshot_restore(request.match_info["name"], snap)
        live.audit_id = audit_after("snapshot.restored", live.name, snapshot=snap, id=live.rec.id)
        return json_response(info(live))

    async def snapshot_remove(self, request: web.Request) -> web.Response:
        name, snap = request.match_info["name"], request.match_info["snap"]
        await self.m.snapshot_remove(name, snap)
        aid = audit_after("snapshot.removed", name, snapshot=snap)
        return json_response({"ok": True, "audit_id": aid})
