"""The routes of the E2B face on `mvmctl serve`: control plane, envd RPC, /files, /health.

In-sandbox calls are told apart by the ``E2b-Sandbox-Id`` header the SDK sends when
``E2B_SANDBOX_URL`` points at this server; the id is the tenant's sandbox name.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web

from mvm import errors, tenancy
from mvm.api import models as M
from mvm.e2b import connect as C
from mvm.e2b.control import Control, e2b_error, from_mvm_error, json_body
from mvm.e2b.envd import STREAM_CT, Envd, RpcError, decode_request, rpc_error, unary_error
from mvm.e2b.snapshots import Snapshots, no_filesystem_only, parse_snapshot_id
from mvm.e2b.watch import Watches
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity

SANDBOX_HEADER = "E2b-Sandbox-Id"
WATCHER_VERBS = ("CreateWatcher", "GetWatcherEvents", "RemoveWatcher")
#: Largest RPC request body.
MAX_RPC_BODY = 1024 * 1024
_HOST_RE = re.compile(r"^\d{1,5}-([a-z0-9][a-z0-9_-]{0,62})\.")
Route = Callable[[web.Request, Identity], Awaitable[web.StreamResponse]]


def sandbox_from_host(host: str) -> str:
    """The sandbox id of an E2B-style host ``<port>-<id>.<domain>`` ("" if it is not one):
    how the SDK addresses envd when only ``E2B_DOMAIN`` is set (wildcard DNS + TLS)."""
    m = _HOST_RE.match(host)
    return m.group(1) if m else ""


def basic_user(request: web.Request) -> str | None:
    """The user the SDK asks a command to run as (``Authorization: Basic <user:>``); mvm
    itself decides what a user name may be."""
    auth = request.headers.get("Authorization", "")
    if auth[:6].lower() != "basic ":
        return None
    try:
        user = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        raise RpcError("invalid_argument", "malformed Authorization header") from None
    return user or None


def _ident(request: web.Request) -> Identity:
    from mvm.serve.app import IDENT_KEY

    ident: Identity = request[IDENT_KEY]
    return ident


def _token(request: web.Request) -> str:
    from mvm.serve.app import bearer

    return bearer(request) or ""


class E2BFace:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream
        self.control = Control(upstream)
        self.envd = Envd(upstream)
        self.snapshots = Snapshots(upstream)
        self.watches = Watches(upstream)

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v2/sandboxes", self._c(self.create))
        r.add_get("/v2/sandboxes", self._c(self.list))
        r.add_get("/sandboxes", self._c(self.list))
        r.add_get("/sandboxes/{id}", self._c(self.get))
        r.add_delete("/sandboxes/{id}", self._c(self.kill))
        r.add_post("/v2/sandboxes/{id}/connect", self._c(self.connect))
        r.add_post("/sandboxes/{id}/pause", self._c(self.pause))
        r.add_post("/sandboxes/{id}/timeout", self._c(self.timeout))
        r.add_post("/sandboxes/{id}/resume", self._c(self.resume))
        r.add_post("/sandboxes/{id}/fork", self._c(self.fork))
        r.add_post("/sandboxes/{id}/snapshots", self._c(self.snapshot))
        r.add_get("/snapshots", self._c(self.list_snapshots))
        r.add_delete("/templates/{id}", self._c(self.delete_template))
        r.add_get("/health", self._e(self.health))
        r.add_get("/files", self._e(self.files_get))
        r.add_post("/files", self._e(self.files_post))
        r.add_post(
            "/{service:(process\\.Process|filesystem\\.Filesystem)}/{method}", self._e(self.rpc)
        )

    def _c(self, fn: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A control-plane route: e2b scope, E2B error bodies."""

        async def handler(request: web.Request) -> web.StreamResponse:
            ident = _ident(request)
            if "e2b" not in ident.scopes:
                return e2b_error(403, "this token may not use the E2B API")
            try:
                return await fn(request, ident)
            except errors.MvmError as exc:
                return from_mvm_error(ident, exc)

        return handler

    def _e(self, fn: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """An envd route: e2b scope and a sandbox of the caller's tenant."""

        async def handler(request: web.Request) -> web.StreamResponse:
            ident = _ident(request)
            if "e2b" not in ident.scopes:
                return unary_error(RpcError("permission_denied", "token may not use E2B"))
            try:
                return await fn(request, ident)
            except RpcError as err:
                return unary_error(err)
            except errors.MvmError as exc:
                return unary_error(rpc_error(ident, exc))

        return handler

    # -- control plane ----------------------------------------------------------------
    async def create(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await json_body(request)
        template = body.get("templateID")
        src = parse_snapshot_id(ident, template) if isinstance(template, str) else None
        if src is not None:
            return await self.snapshots.restore(ident, src, body, _token(request))
        return await self.control.create(ident, body, _token(request))

    async def list(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        return await self.control.list(ident, request.query)

    async def get(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        return await self.control.get(ident, request.match_info["id"])

    async def kill(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        return await self.control.kill(ident, request.match_info["id"])

    async def connect(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await json_body(request)
        no_filesystem_only(body, "resume (on_resume='reboot')")
        return await self.control.connect(ident, request.match_info["id"], body, _token(request))

    async def resume(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        """The older ``/resume``: like connect, but only for a paused sandbox (409 else)."""
        body = await json_body(request)
        sid = request.match_info["id"]
        info = await self.control._info(ident, sid)
        if info.state != "paused":
            return e2b_error(409, f"sandbox {sid} is not paused")
        return await self.control.connect(ident, sid, body, _token(request))

    async def pause(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        no_filesystem_only(await json_body(request), "pause")
        return await self.control.pause(ident, request.match_info["id"])

    async def fork(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await json_body(request)
        return await self.snapshots.fork(ident, request.match_info["id"], body, _token(request))

    async def snapshot(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await json_body(request)
        return await self.snapshots.create(ident, request.match_info["id"], body)

    async def list_snapshots(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        return await self.snapshots.list(ident, request.query)

    async def delete_template(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        return await self.snapshots.delete(ident, request.match_info["id"])

    async def timeout(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await json_body(request)
        return await self.control.set_timeout(ident, request.match_info["id"], body)

    # -- envd -------------------------------------------------------------------------
    async def _sandbox(self, request: web.Request, ident: Identity) -> str:
        """mvmd's name of the sandbox this envd call is for (it must be running)."""
        sid = request.headers.get(SANDBOX_HEADER) or sandbox_from_host(request.host)
        name = tenancy.sandbox_for(ident.tenant, sid)
        info = await self.up.typed(M.SandboxInfo, ident, "GET", f"/sandboxes/{name}")
        if info.state != "running":
            raise RpcError("unavailable", f"sandbox {sid} is {info.state}")
        return name

    async def health(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        await self._sandbox(request, ident)
        return web.Response(status=204)

    async def rpc(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        method = f"{request.match_info['service']}/{request.match_info['method']}"
        streaming = request.content_type == STREAM_CT
        raw = await request.content.read(MAX_RPC_BODY + 1)
        if len(raw) > MAX_RPC_BODY:
            raise RpcError("resource_exhausted", "request too large")
        body = decode_request(raw, streaming)
        name = await self._sandbox(request, ident)
        if not streaming:
            service, _, verb = method.partition("/")
            if service == "filesystem.Filesystem" and verb in WATCHER_VERBS:
                try:
                    return web.json_response(await self.watches.unary(ident, name, verb, body))
                except errors.MvmError as exc:
                    raise rpc_error(ident, exc) from None
            return web.json_response(await self.envd.unary(ident, name, method, body))
        if method == "filesystem.Filesystem/WatchDir":
            return await self._watch(request, ident, name, body)
        if method == "process.Process/Start":
            pid = await self.envd.start(ident, name, body, user=basic_user(request))
        elif method == "process.Process/Connect":
            from mvm.e2b.envd import _pid

            pid = _pid(body)
        else:
            raise RpcError("unimplemented", f"{method} is not implemented by mvm's envd face")
        resp = web.StreamResponse(status=200, headers={"content-type": STREAM_CT})
        await resp.prepare(request)
        try:
            await self.envd.stream(ident, name, pid, resp)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away (a background command handle, say)
        return resp

    async def _watch(
        self, request: web.Request, ident: Identity, name: str, body: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"content-type": STREAM_CT})
        try:
            await self.watches.stream(ident, name, body, resp, prepare=request)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client stopped watching
        return resp

    async def files_get(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        name = await self._sandbox(request, ident)
        path = request.query.get("path", "")
        if not path:
            raise RpcError("invalid_argument", "path is required")
        data = await self.up.call(ident, "GET", f"/sandboxes/{name}/files", params={"path": path})
        return web.Response(body=data, content_type="application/octet-stream")

    async def files_post(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        name = await self._sandbox(request, ident)
        query_path = request.query.get("path")
        written: list[dict[str, Any]] = []
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                path = query_path or part.filename or ""
                data = await part.read(decode=False)
                written.append(await self._write(ident, name, path, bytes(data)))
        else:
            data = await request.content.read(M.MAX_FILE_WRITE + 1)
            if len(data) > M.MAX_FILE_WRITE:
                raise RpcError("resource_exhausted", "file too large")
            written.append(await self._write(ident, name, query_path or "", data))
        return web.json_response(written)

    async def _write(self, ident: Identity, name: str, path: str, data: bytes) -> dict[str, Any]:
        if not path:
            raise RpcError("invalid_argument", "path is required")
        await self.up.call(
            ident, "PUT", f"/sandboxes/{name}/files", params={"path": path}, data=data
        )
        return {"name": path.rsplit("/", 1)[-1], "type": "file", "path": path}


__all__ = ["C", "E2BFace"]
