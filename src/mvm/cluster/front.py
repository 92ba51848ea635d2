"""The cluster front: `mvmctl serve`'s server (tokens, tenants, limits, the E2B face) over
a routing upstream instead of one mvmd.

:class:`mvm.serve.app.Server` and :class:`mvm.serve.native.NativeRelay` are reused as they
are: they authenticate, map the tenant's names and call ``upstream.open``. Here that call
places a create on a host (:mod:`mvm.cluster.placement`, retried on the next host when
one fails), sends every later call to the host owning the sandbox (its relay, with the
cluster key), merges the lists (each sandbox with its ``host``; a lost host's sandboxes as
``lost``) and has the chosen host's mvmd write one ``cluster.place`` audit record (the
front writes none: audit is the service's, as with ``serve``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from mvm import errors
from mvm.api import models as M
from mvm.cluster import placement
from mvm.cluster.host import KEY_HEADER
from mvm.cluster.registry import Registry
from mvm.daemon.server import error_body
from mvm.serve.app import IDENT_KEY, Server
from mvm.serve.upstream import ACTOR_HEADER, TENANT_HEADER, Upstream
from mvm.tenancy import LOCAL
from mvm.tokens import TokenStore

log = logging.getLogger(__name__)
#: A host's answers to a create that send it to the next host: its admission (a host's
#: own policy) refused, or it is over its limits.
RETRY_ON = (403, 429)


class _Content:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def iter_any(self) -> Any:
        yield self.body

    async def read(self) -> bytes:
        return self.body


class Canned:
    """A finished answer made by the front (a merged list, an error) that looks like the
    aiohttp response ``NativeRelay`` and ``Upstream.call`` read."""

    def __init__(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.status = status
        self.headers = {"content-type": ctype}
        self.content = _Content(body)

    @classmethod
    def error(cls, exc: errors.MvmError) -> Canned:
        return cls(errors.http_status(exc), msgspec.json.encode(error_body(exc)))

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Canned:
        return cls(status, msgspec.json.encode(obj))

    async def read(self) -> bytes:
        return self.content.body

    async def __aenter__(self) -> Canned:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def _shape(body: dict[str, Any]) -> placement.Shape:
    d = M.SandboxShape()
    return placement.Shape(
        image=str(body.get("image") or d.image),
        cpus=int(body.get("cpus") or d.cpus),
        memory_mb=int(body.get("memory_mb") or d.memory_mb),
    )


class RoutingUpstream(Upstream):
    """``Upstream`` over many hosts: the same ``open``/``call``, routed."""

    def __init__(self, reg: Registry, policy: placement.Policy = "spread") -> None:
        super().__init__("", autostart=False)
        self.reg = reg
        self.policy = policy
        self._tcp: aiohttp.ClientSession | None = None

    @property
    def tcp(self) -> aiohttp.ClientSession:
        if self._tcp is None:
            self._tcp = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
            )
        return self._tcp

    async def close(self) -> None:
        if self._tcp is not None:
            await self._tcp.close()

    async def to_host(self, host: str, method: str, path: str, **kw: Any) -> Any:
        h = self.reg.hosts[host]
        headers = {**kw.pop("headers", {}), KEY_HEADER: self.reg.key}
        return await self.tcp.request(
            method, f"{h.url}/{M.API_VERSION}{path}", headers=headers, **kw
        )

    async def open(self, method: str, path: str, **kw: Any) -> Any:
        parts = path.strip("/").split("/")
        if parts[0] == "sandboxes" and len(parts) == 1:
            if method == "POST":
                return await self._create(kw)
            return await self._list(kw)
        if parts[0] == "sandboxes":
            return await self._routed(parts[1], method, path, kw)
        live = [h.name for h in self.reg.hosts.values() if h.alive]
        if not live:
            return Canned.error(errors.MvmError("no live host in the cluster"))
        return await self._send(live[0], method, path, kw)

    async def _send(self, host: str, method: str, path: str, kw: dict[str, Any]) -> Any:
        try:
            return await self.to_host(host, method, path, **kw)
        except aiohttp.ClientConnectionError as exc:
            h = self.reg.hosts[host]
            await self.reg.report(h)  # a dead actor is found now, not at the next round
            return Canned.error(errors.MvmError(f"host {host} is not answering: {exc}"))

    async def _routed(self, name: str, method: str, path: str, kw: dict[str, Any]) -> Any:
        host = self.reg.owner.get(name)
        if host is None and name not in self.reg.lost:
            await self._list({"headers": {}})  # created behind the front's back?
            host = self.reg.owner.get(name)
        lost = self.reg.lost.get(name)
        if host is None and lost is not None:
            if method == "DELETE" and path.count("/") == 2:
                del self.reg.lost[name]  # forgetting a lost sandbox is all `down` can do
                return Canned.json({**lost.info, "state": "lost", "reason": lost.reason})
            return Canned.error(
                errors.SandboxStateError(
                    f"sandbox {name} was lost with host {lost.host}: {lost.reason}",
                    hint="`mvmctl down` forgets it; create it again",
                )
            )
        if host is None:
            return Canned.error(errors.SandboxNotFound(f"no sandbox named {name}"))
        resp = await self._send(host, method, path, kw)
        if method == "DELETE" and path.count("/") == 2 and resp.status < 300:
            self.reg.owner.pop(name, None)
            self.reg.hosts[host].sandboxes.pop(name, None)
        return resp

    async def _list(self, kw: dict[str, Any]) -> Canned:
        live = [h for h in self.reg.hosts.values() if h.alive]
        answers = await asyncio.gather(
            *(self._get_json(h.name, "/sandboxes", kw.get("headers", {})) for h in live),
            return_exceptions=True,
        )
        out: list[dict[str, Any]] = []
        for h, ans in zip(live, answers, strict=True):
            if isinstance(ans, BaseException) or not isinstance(ans, list):
                continue
            for s in ans:
                if isinstance(s, dict):
                    out.append({**s, "host": h.name})
            if kw.get("headers", {}).get(TENANT_HEADER, LOCAL) == LOCAL:  # the full list
                self.reg.set_listing(h, [s for s in ans if isinstance(s, dict)])
        for lost in self.reg.lost.values():
            out.append({**lost.info, "state": "lost", "reason": lost.reason, "host": lost.host})
        return Canned.json(out)

    async def _get_json(self, host: str, path: str, headers: dict[str, str]) -> Any:
        async with await self.to_host(host, "GET", path, headers=dict(headers)) as r:
            raw = await r.read()
            if r.status >= 400:
                raise errors.MvmError(f"host {host} answered {r.status}")
            return msgspec.json.decode(raw)

    async def _create(self, kw: dict[str, Any]) -> Any:
        data = kw.get("data")
        if not isinstance(data, bytes):
            data = await data.read() if data is not None else b"{}"
        try:
            body = msgspec.json.decode(data)
            assert isinstance(body, dict)
            shape = _shape(body)
        except (msgspec.DecodeError, AssertionError, ValueError, TypeError):
            return Canned.error(errors.InvalidArgument("a create body must be a JSON object"))
        name = body.get("name")
        if isinstance(name, str):
            if name in self.reg.owner or name in self.reg.lost or name in self.reg.pending:
                return Canned.error(errors.SandboxExists(f"sandbox {name} already exists"))
            self.reg.pending.add(name)
        try:
            return await self._place(body, shape, data, kw)
        finally:
            if isinstance(name, str):
                self.reg.pending.discard(name)

    async def _place(
        self, body: dict[str, Any], shape: placement.Shape, data: bytes, kw: dict[str, Any]
    ) -> Any:
        tried: list[dict[str, str]] = []
        last: Canned | None = None
        headers = kw.get("headers", {})
        while True:
            done = frozenset(t["host"] for t in tried)
            order = placement.rank(self.reg.capacities(), shape, policy=self.policy, exclude=done)
            if not order and last is not None and last.status < 500:
                return last
            if not order:
                msg = "no host can take this sandbox" + (f" (tried: {tried})" if tried else "")
                return Canned.error(errors.MvmError(msg, hint="see `mvmctl cluster status`"))
            params = dict(kw.get("params") or {})
            want = params.pop("host", None)
            if want is not None:  # ?host=NAME: the caller's choice, if it can take it
                if want not in order:
                    return Canned.error(errors.InvalidArgument(f"host {want!r} cannot take it"))
                order = [want]
            host = order[0]
            self.reg.hosts[host].placed += 1
            try:
                await self._image_to(host, shape.image)
                async with await self.to_host(
                    host,
                    "POST",
                    "/sandboxes",
                    data=data,
                    params=params,
                    headers=dict(headers),
                ) as r:
                    raw = await r.read()
                    status, ctype = r.status, r.headers.get("content-type", "application/json")
            except (aiohttp.ClientError, errors.MvmError) as exc:
                tried.append({"host": host, "error": f"{exc!r}"[:200]})
                await self.reg.report(self.reg.hosts[host])
                continue
            if status >= 500 or status in RETRY_ON:
                # The host failed, or its own admission (its policy) or limits refused:
                # another host may take it. All refusing: the last one's answer.
                tried.append({"host": host, "error": f"HTTP {status}: {raw[:200]!r}"})
                last = Canned(status, raw, ctype)
                if want is not None:  # the caller's one host: its answer
                    return last
                continue
            if status < 300:
                await self._placed(host, raw, headers, tried, shape)
            return Canned(status, raw, ctype)

    async def _image_to(self, host: str, image: str) -> None:
        """Copy ``image`` to ``host`` from a host that has it, if it lacks it."""
        h = self.reg.hosts[host]
        if image in h.cap.images or not h.report:
            return
        src = next((o for o in self.reg.hosts.values() if o.alive and image in o.cap.images), None)
        if src is None:
            return  # nobody has it: the host's own mvmd says what is wrong
        try:
            got = await h.actor.import_image.remote(src.url, image)
        except Exception as exc:  # Ray wraps the host's error
            raise errors.MvmError(f"image {image} not copied to {host}: {exc}"[:300]) from None
        h.cap.images.append(image)
        log.info("image %s copied %s -> %s: %s", image, src.name, host, got)

    async def _placed(
        self,
        host: str,
        raw: bytes,
        headers: dict[str, str],
        tried: list[dict[str, str]],
        shape: placement.Shape,
    ) -> None:
        """Learn the owner, and have the host's mvmd write the one ``cluster.place``
        record (in the sandbox's chain there: the front itself writes no audit)."""
        try:
            info = msgspec.json.decode(raw)
            name = str(info["name"])
        except (msgspec.DecodeError, KeyError, TypeError):
            return
        self.reg.owner[name] = host
        self.reg.hosts[host].sandboxes[name] = info
        body = {"host": host, "shape": shape.key(), "policy": self.policy, "failed": tried}
        owner = {
            ACTOR_HEADER: headers.get(ACTOR_HEADER, "cluster"),
            "content-type": "application/json",
        }
        try:
            async with await self.to_host(
                host, "POST", f"/sandboxes/{name}/cluster-placed",
                data=msgspec.json.encode(body), headers=owner,
            ) as r:  # fmt: skip
                if r.status >= 300:
                    log.error("cluster.place of %s on %s: HTTP %s", name, host, r.status)
        except aiohttp.ClientError as exc:
            log.error("cluster.place of %s on %s failed: %s", name, host, exc)


class ClusterServer(Server):
    """`serve`'s server plus the cluster's admin routes (admin scope only)."""

    def __init__(self, up: RoutingUpstream, tokens: TokenStore | None = None) -> None:
        super().__init__(up, tokens)
        self.cluster = up
        self.admin: dict[str, Any] = {}  # route -> async handler, filled by the supervisor

    async def native_route(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        parts = tail.split("/")
        if len(parts) == 3 and parts[0] == "sandboxes" and parts[2] == "migrate":
            return await self._migrate(request, parts[1])
        if not tail.startswith("cluster/"):
            return await super().native_route(request)
        if "admin" not in request[IDENT_KEY].scopes:
            return web.json_response({"code": 403, "message": "admin scope needed"}, status=403)
        reg = self.cluster.reg
        if parts == ["cluster", "status"] and request.method == "GET":
            return web.json_response({**reg.status(), "policy": self.cluster.policy})
        if len(parts) == 4 and parts[1] == "hosts" and parts[3] == "rejoin":
            if parts[2] not in reg.hosts:
                return web.json_response({"code": 404, "message": "no such host"}, status=404)
            h = await reg.rejoin(parts[2])
            return web.json_response({"name": h.name, "url": h.url, "alive": h.alive})
        handler = self.admin.get("/".join(parts[1:3]))
        if handler is not None:
            resp: web.StreamResponse = await handler(request, parts)
            return resp
        raise web.HTTPNotFound()

    async def _migrate(self, request: web.Request, name: str) -> web.StreamResponse:
        """``POST /v1/sandboxes/NAME/migrate?to=HOST``: move it there, name kept."""
        from mvm import tenancy
        from mvm.cluster.migrate import migrate

        ident = request[IDENT_KEY]
        if "sandboxes" not in ident.scopes or request.method != "POST":
            return web.json_response({"code": 403, "message": "not allowed"}, status=403)
        sb = tenancy.sandbox_for(ident.tenant, name)
        reg = self.cluster.reg
        to = request.query.get("to", "")
        src = reg.owner.get(sb)
        if src is None:
            raise errors.SandboxNotFound(f"sandbox {name} not found", name=name)
        if to not in reg.hosts or not reg.hosts[to].alive:
            raise errors.InvalidArgument(f"no live host {to!r}", hint="see `mvmctl cluster status`")
        if to == src:
            raise errors.InvalidArgument(f"{name} already runs on {to}")
        try:
            out = await migrate(self.cluster, self.cluster.headers(ident), sb, src, to)
        except errors.MvmError:
            raise
        except Exception as exc:  # a host actor's failure (Ray wraps it)
            raise errors.MvmError(f"migration failed: {str(exc)[-300:]}") from None
        out["name"] = name
        return web.json_response(out)
