"""mvmd's fork routes: adapters (parse, call the service, render) kept apart from the
main route table so the fork verb is one addition to it."""

from __future__ import annotations

from aiohttp import web

from mvm.api import fork as F
from mvm.daemon import server as S
from mvm.service import SandboxService


def add_routes(router: web.UrlDispatcher, prefix: str, service: SandboxService) -> None:
    """``POST {prefix}/fork`` (children of a running sandbox) and
    ``POST {prefix}/snapshots/{snap}/restore-as`` (a snapshot as a new sandbox)."""

    async def fork(request: web.Request) -> web.Response:
        req = await S.body_as(request, F.ForkRequest)
        return S.json_response(await service.fork.fork(S.name(request), req), 201)

    async def restore_as(request: web.Request) -> web.Response:
        req = await S.body_as(request, F.RestoreAs)
        snap = request.match_info["snap"]
        out = await service.fork.restore_as(S.name(request), snap, req.name)
        return S.json_response(out, 201)

    router.add_post(f"{prefix}/fork", fork)
    router.add_post(f"{prefix}/snapshots/{{snap}}/restore-as", restore_as)
