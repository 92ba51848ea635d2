"""The native mvm API (``/v1/...``) over TCP: a relay to mvmd with the tenant's names.

Requests are checked and rewritten with :mod:`mvm.tenancy` (sandbox names in the path,
the name and secret names in bodies, no host mounts or wildcard forwards for a remote
tenant), streamed to mvmd's socket, and the answers streamed back with the tenant's
prefix taken out (NDJSON line by line; file bodies untouched).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from mvm import errors, tenancy
from mvm.api import models as M
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity

#: Largest JSON body (create, exec, procs) read and rewritten here.
MAX_JSON_BODY = M.MAX_BODY
_PASSTHROUGH = ("content-type",)
#: What one segment of a relayed path may be (route words, names, ids).
_PART = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _decode_obj(raw: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise errors.InvalidArgument(f"bad request body: {exc}") from None
    if not isinstance(obj, dict):
        raise errors.InvalidArgument("bad request body: expected a JSON object")
    return obj


def _map_secrets(tenant: str, obj: dict[str, Any]) -> None:
    se = obj.get("secret_env")
    if isinstance(se, dict):
        obj["secret_env"] = {
            k: tenancy.to_service(tenant, v, "secret") if isinstance(v, str) else v
            for k, v in se.items()
        }


def rewrite_create(tenant: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A create body for mvmd: the tenant's name mapped (or a fresh one), its secrets
    mapped, and what only the host's owner may ask for refused."""
    if tenant == tenancy.LOCAL:
        return obj
    name = obj.get("name")
    obj["name"] = (
        tenancy.new_name(tenant) if name is None else tenancy.to_service(tenant, str(name))
    )
    _map_secrets(tenant, obj)
    if obj.get("mounts"):
        raise errors.PolicyDenied("host mounts are not available to remote tenants")
    _check_ports(obj.get("ports"))
    return obj


def _check_ports(ports: object) -> None:
    if isinstance(ports, list) and any(
        isinstance(p, dict) and p.get("allow_wildcard") for p in ports
    ):
        raise errors.PolicyDenied("wildcard forwards are not available to remote tenants")


class NativeRelay:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    async def handle(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        parts = tail.split("/")
        if not all(_PART.fullmatch(p) and p not in (".", "..") for p in parts):
            # "..", "%2e%2e", "?" or "#" in a path must never reach mvmd (or another
            # tenant's sandbox, or /shutdown) after the name was mapped.
            raise web.HTTPNotFound()
        tenant = ident.tenant
        if parts == ["status"]:
            return await self._status(request, ident)
        if parts == ["calls"] and request.method == "POST":  # a client's own call, audited
            return await self._relay(request, ident, "/calls", await self._read_json(request))
        if parts[0] != "sandboxes":
            raise web.HTTPNotFound()
        body: bytes | None = None
        if len(parts) == 1:
            if request.method == "POST":
                raw = await self._read_json(request)
                body = msgspec.json.encode(rewrite_create(tenant, _decode_obj(raw)))
        else:
            parts[1] = tenancy.sandbox_for(tenant, parts[1])
            if request.method == "POST" and len(parts) == 3 and parts[2] in ("exec", "procs"):
                obj = _decode_obj(await self._read_json(request))
                if tenant != tenancy.LOCAL:
                    _map_secrets(tenant, obj)
                body = msgspec.json.encode(obj)
            elif request.method == "POST" and (
                parts[2:] == ["fork"] or (len(parts) == 5 and parts[4] == "restore-as")
            ):
                # The child's name is the tenant's: mapped like a create's.
                obj = _decode_obj(await self._read_json(request))
                if tenant != tenancy.LOCAL and isinstance(obj.get("name"), str):
                    obj["name"] = tenancy.to_service(tenant, obj["name"])
                body = msgspec.json.encode(obj)
            elif request.method == "POST" and parts[2:] == ["forwards"]:
                raw = await self._read_json(request)
                if tenant != tenancy.LOCAL:
                    _check_ports([_decode_obj(raw)])
                body = raw
        return await self._relay(request, ident, "/" + "/".join(parts), body)

    async def _read_json(self, request: web.Request) -> bytes:
        raw = await request.content.read(MAX_JSON_BODY + 1)
        if len(raw) > MAX_JSON_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_JSON_BODY, actual_size=len(raw))
        return raw

    async def _status(self, request: web.Request, ident: Identity) -> web.Response:
        st = await self.up.typed(M.DaemonStatus, ident, "GET", "/status")
        listed = await self.up.typed(list[M.SandboxInfo], ident, "GET", "/sandboxes")
        st.sandboxes = sum(1 for s in listed if tenancy.owns(ident.tenant, s.name))
        st.socket = "tcp"
        return web.json_response(msgspec.to_builtins(st))

    async def _relay(
        self, request: web.Request, ident: Identity, path: str, body: bytes | None
    ) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSTHROUGH}
        if body is not None:
            headers["content-type"] = "application/json"
            data: Any = body
        else:
            data = request.content if request.can_read_body else None
        async with await self.up.open(
            request.method,
            path,
            params=request.query,
            data=data,
            headers=self.up.headers(ident, headers),
        ) as up:
            ctype = up.headers.get("content-type", "application/octet-stream")
            resp = web.StreamResponse(status=up.status, headers={"content-type": ctype})
            await resp.prepare(request)
            rewrite = ctype.startswith(("application/json", "application/x-ndjson"))
            p = tenancy.prefix(ident.tenant).encode()
            if rewrite and p:
                await self._relay_lines(up.content, resp, p, ident, path)
            else:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            await resp.write_eof()
            return resp

    @staticmethod
    async def _relay_lines(
        content: Any, resp: web.StreamResponse, p: bytes, ident: Identity, path: str
    ) -> None:
        """Copy JSON/NDJSON with the tenant prefix removed; a list of sandboxes keeps only
        the tenant's own."""
        listing = path == "/sandboxes"
        buf = bytearray()
        async for chunk in content.iter_any():
            buf += chunk
            if listing:
                continue
            cut = buf.rfind(b"\n") + 1
            if cut:
                await resp.write(bytes(buf[:cut]).replace(p, b""))
                del buf[:cut]
        if listing and buf.startswith(b"["):
            items = msgspec.json.decode(bytes(buf))
            mine = [
                s
                for s in items
                if isinstance(s, dict) and tenancy.owns(ident.tenant, str(s.get("name", "")))
            ]
            buf = bytearray(msgspec.json.encode(mine))
        await resp.write(bytes(buf).replace(p, b""))
