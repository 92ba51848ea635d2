"""mvmd's live-migration routes (the cluster front drives them through the host relays):
adapters only — parse, call ``service.migration``, render."""

from __future__ import annotations

from aiohttp import web

from mvm.api import migrate as G
from mvm.audit.log import acting
from mvm.daemon import server as S
from mvm.errors import PolicyDenied
from mvm.service import SandboxService


def add_routes(router: web.UrlDispatcher, prefix: str, service: SandboxService) -> None:
    """Under ``{prefix}/migration``: ``GET plan``, ``POST out``, ``POST out/abort``,
    ``POST out/commit`` (source); ``POST in``, ``POST in/finish``, ``POST in/abort``
    (destination); and ``POST {prefix}/cluster-placed`` (the front's placement record)."""
    m = service.migration

    def owner(request: web.Request) -> str:
        # Only the host's owner (its own mvmctl, the cluster front through the host relay
        # with the cluster key) moves a VM's memory over the network: a request relayed
        # for a tenant (`mvmctl serve`) may not name a stream's destination.
        if acting() is not None:
            raise PolicyDenied("live migration is the host owner's, not a tenant's")
        return S.name(request)

    async def plan(request: web.Request) -> web.Response:
        return S.json_response(m.plan(owner(request)))

    async def out(request: web.Request) -> web.Response:
        req = await S.body_as(request, G.MigrateOut)
        return S.json_response(await m.out(owner(request), req))

    async def out_abort(request: web.Request) -> web.Response:
        return S.json_response(await m.abort_out(owner(request)))

    async def out_commit(request: web.Request) -> web.Response:
        req = await S.body_as(request, G.Commit)
        return S.json_response(await m.commit(owner(request), req.to_host))

    async def in_(request: web.Request) -> web.Response:
        req = await S.body_as(request, G.MigrateIn)
        return S.json_response(await m.incoming(owner(request), req), 201)

    async def in_finish(request: web.Request) -> web.Response:
        return S.json_response(await m.finish(owner(request)))

    async def in_abort(request: web.Request) -> web.Response:
        await m.abort_in(owner(request))
        return S.json_response({"aborted": True})

    async def placed(request: web.Request) -> web.Response:
        req = await S.body_as(request, G.Placed)
        return S.json_response({"audit_id": m.placed(owner(request), req)})

    router.add_post(f"{prefix}/cluster-placed", placed)
    base = f"{prefix}/migration"
    router.add_get(f"{base}/plan", plan)
    router.add_post(f"{base}/out", out)
    router.add_post(f"{base}/out/abort", out_abort)
    router.add_post(f"{base}/out/commit", out_commit)
    router.add_post(f"{base}/in", in_)
    router.add_post(f"{base}/in/finish", in_finish)
    router.add_post(f"{base}/in/abort", in_abort)
