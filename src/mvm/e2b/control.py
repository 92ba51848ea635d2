"""E2B's control plane (``/v2/sandboxes``, ``/sandboxes/{id}``...) over mvm's native API.

An E2B sandbox id is the tenant's own mvm sandbox name; ``templateID`` is an mvm image
or preset (``base`` means mvm's default image). Every call goes to mvmd through
:class:`mvm.serve.upstream.Upstream`, so admission, secrets, redaction and audit apply
as for ``mvmctl``. Errors are E2B's ``{"code", "message"}`` with the HTTP status.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any, Final

import msgspec
from aiohttp import web

from mvm import errors, tenancy
from mvm.api import models as M
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity

#: The envd version this face claims (see docs/e2b.md for what it switches on).
ENVD_VERSION: Final = "0.5.7"
CLIENT_ID: Final = "mvm"
#: E2B's default template, and the mvm image it stands for.
TEMPLATE_ALIASES: Final = {"base": "python"}
DEFAULT_TIMEOUT: Final = 300


def e2b_error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def from_mvm_error(ident: Identity, exc: errors.MvmError) -> web.Response:
    return e2b_error(errors.http_status(exc), tenancy.unprefix_text(ident.tenant, exc.message))


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def sandbox_view(ident: Identity, info: M.SandboxInfo, *, detail: bool) -> dict[str, Any]:
    """A ``SandboxDetail`` / ``ListedSandbox`` body for one of the tenant's sandboxes."""
    meta = {k[4:]: v for k, v in info.tags.items() if k.startswith("e2b.")}
    out: dict[str, Any] = {
        "templateID": meta.pop("template", info.image),
        "sandboxID": tenancy.from_service(ident.tenant, info.name),
        "clientID": CLIENT_ID,
        "startedAt": _iso(info.created),
        "endAt": _iso(info.expires_at),
        "envdVersion": ENVD_VERSION,
        "cpuCount": info.cpus,
        "memoryMB": info.memory_mb,
        "diskSizeMB": info.disk_mb,
        "state": "paused" if info.state == "paused" else "running",
        "metadata": meta,
    }
    if detail:
        out["domain"] = None
    return out


def created_view(ident: Identity, info: M.SandboxInfo, token: str) -> dict[str, Any]:
    """The answer to create and connect: the caller's own token is the envd access token."""
    return {
        "sandboxID": tenancy.from_service(ident.tenant, info.name),
        "templateID": info.tags.get("e2b.template", info.image),
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "domain": None,
    }


def _timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise errors.InvalidArgument("timeout must be a positive number of seconds")
    return min(float(value), M.MAX_TTL)


def network_allow(network: object) -> list[str]:
    """mvm allow-list entries for E2B's ``network`` options: ``allowOut`` hosts become
    ``allow`` patterns (admission still checks them); what mvm cannot honour is refused,
    never silently dropped."""
    if network is None:
        return []
    if not isinstance(network, dict):
        raise errors.InvalidArgument("network must be an object")
    allow = network.get("allowOut") or []
    if not isinstance(allow, list) or not all(isinstance(h, str) and h for h in allow):
        raise errors.InvalidArgument("network.allowOut must be a list of host names")
    unsupported = sorted(
        k for k, v in network.items() if k not in ("allowOut", "allowPublicTraffic") and v
    )
    if unsupported:
        raise errors.InvalidArgument(
            f"network option(s) {', '.join(unsupported)} are not supported by mvm",
            hint="mvm denies all egress unless allowed: list hosts in allowOut",
        )
    return list(allow)


def create_request(ident: Identity, body: dict[str, Any]) -> M.CreateSandbox:
    """mvm's create request for an E2B ``NewSandbox`` body (names mapped for the tenant)."""
    template = body.get("templateID")
    if not isinstance(template, str) or not template:
        raise errors.InvalidArgument("templateID is required")
    image = TEMPLATE_ALIASES.get(template, template)
    envs = body.get("envVars") or {}
    meta = body.get("metadata") or {}
    if not isinstance(envs, dict) or not isinstance(meta, dict):
        raise errors.InvalidArgument("envVars and metadata must be objects")
    tags = {f"e2b.{k}": str(v) for k, v in meta.items()}
    tags["e2b.template"] = template
    # mvm denies the network unless asked: E2B's allowInternetAccess asks explicitly.
    preset = "unrestricted" if body.get("allowInternetAccess") is True else "none"
    allow = network_allow(body.get("network"))
    if body.get("volumeMounts") or body.get("mcp"):
        raise errors.InvalidArgument("volumeMounts and mcp are not supported by mvm")
    return M.CreateSandbox(
        name=tenancy.new_name(ident.tenant),
        image=image,
        ttl_seconds=_timeout(body.get("timeout"), DEFAULT_TIMEOUT),
        env={str(k): str(v) for k, v in envs.items()},
        network=M.NetworkSpec(preset=preset, allow=allow),
        tags=tags,
    )


def page(items: list[Any], limit: object, token: object) -> tuple[list[Any], str | None]:
    """One page of ``items`` (``limit`` 1..1000, default 100) from the offset ``token``
    names, and the token of the next page (None on the last)."""
    try:
        n = max(1, min(int(str(limit)), 1000)) if limit not in (None, "") else 100
        start = int(str(token)) if token not in (None, "") else 0
    except ValueError:
        raise errors.InvalidArgument("limit and nextToken must be integers") from None
    if start < 0:
        raise errors.InvalidArgument("nextToken must not be negative")
    end = start + n
    return items[start:end], (str(end) if end < len(items) else None)


class Control:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    async def _info(self, ident: Identity, sid: str) -> M.SandboxInfo:
        name = tenancy.sandbox_for(ident.tenant, sid)
        info: M.SandboxInfo = await self.up.typed(M.SandboxInfo, ident, "GET", f"/sandboxes/{name}")
        return info

    async def create(self, ident: Identity, body: dict[str, Any], token: str) -> web.Response:
        req = create_request(ident, body)
        info = await self.up.typed(M.SandboxInfo, ident, "POST", "/sandboxes", json=req)
        return web.json_response(created_view(ident, info, token), status=201)

    async def get(self, ident: Identity, sid: str) -> web.Response:
        info = await self._info(ident, sid)
        if info.state not in ("running", "paused"):
            raise errors.SandboxNotFound(f"sandbox {sid} not found")
        return web.json_response(sandbox_view(ident, info, detail=True))

    async def list(self, ident: Identity, query: Any) -> web.Response:
        listed: list[M.SandboxInfo] = await self.up.typed(
            list[M.SandboxInfo], ident, "GET", "/sandboxes"
        )
        states = {s for s in str(query.get("state", "")).split(",") if s}
        # The SDK quotes each key and value, then url-encodes the pairs.
        pairs = urllib.parse.parse_qsl(str(query.get("metadata", "")))
        wanted = {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}
        out = []
        for info in sorted(listed, key=lambda i: i.created):
            if not tenancy.owns(ident.tenant, info.name) or info.state not in (
                "running",
                "paused",
            ):
                continue
            view = sandbox_view(ident, info, detail=False)
            if states and view["state"] not in states:
                continue
            if any(view["metadata"].get(k) != v for k, v in wanted.items()):
                continue
            out.append(view)
        items, nxt = page(out, query.get("limit"), query.get("nextToken"))
        headers = {"x-next-token": nxt} if nxt else None
        return web.json_response(items, headers=headers)

    async def connect(
        self, ident: Identity, sid: str, body: dict[str, Any], token: str
    ) -> web.Response:
        info = await self._info(ident, sid)
        status = 200
        if info.state == "paused":
            info = await self.up.typed(
                M.SandboxInfo, ident, "POST", f"/sandboxes/{info.name}/resume"
            )
            status = 201
        if body.get("timeout") is not None:
            ttl = M.TtlRequest(ttl_seconds=_timeout(body.get("timeout"), DEFAULT_TIMEOUT))
            info = await self.up.typed(
                M.SandboxInfo, ident, "POST", f"/sandboxes/{info.name}/ttl", json=ttl
            )
        return web.json_response(created_view(ident, info, token), status=status)

    async def pause(self, ident: Identity, sid: str) -> web.Response:
        info = await self._info(ident, sid)
        if info.state == "paused":
            return e2b_error(409, f"sandbox {sid} is already paused")
        await self.up.call(ident, "POST", f"/sandboxes/{info.name}/pause")
        return web.Response(status=204)

    async def set_timeout(self, ident: Identity, sid: str, body: dict[str, Any]) -> web.Response:
        name = tenancy.sandbox_for(ident.tenant, sid)
        ttl = M.TtlRequest(ttl_seconds=_timeout(body.get("timeout"), DEFAULT_TIMEOUT))
        await self.up.call(ident, "POST", f"/sandboxes/{name}/ttl", json=ttl)
        return web.Response(status=204)

    async def kill(self, ident: Identity, sid: str) -> web.Response:
        name = tenancy.sandbox_for(ident.tenant, sid)
        await self.up.call(ident, "DELETE", f"/sandboxes/{name}", timeout=120.0)
        return web.Response(status=204)


async def json_body(request: web.Request, limit: int = 1024 * 1024) -> dict[str, Any]:
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise errors.InvalidArgument("request body too large")
    if not raw.strip():
        return {}
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise errors.InvalidArgument("request body is not JSON") from None
    if not isinstance(obj, dict):
        raise errors.InvalidArgument("request body must be a JSON object")
    return obj
