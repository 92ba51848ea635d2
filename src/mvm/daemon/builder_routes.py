"""mvmd's builder routes: adapters over ``service.builders`` (parse, call, render), kept
apart from the main route table. A builder's logs and ``down`` are the sandbox routes'."""

from __future__ import annotations

from aiohttp import web

from mvm.daemon import server as S
from mvm.service import SandboxService
from mvm.service.builders import BuilderRequest
from mvm.service.live import info


def add_routes(router: web.UrlDispatcher, prefix: str, service: SandboxService) -> None:
    """``GET|POST {prefix}/builders`` (list, up), ``POST {prefix}/builders/claim`` and
    ``POST {prefix}/builders/{name}/release`` (one build's hold on a builder)."""
    b = service.builders

    async def listing(request: web.Request) -> web.Response:
        return S.json_response(b.all())

    async def up(request: web.Request) -> web.Response:
        req = await S.body_as(request, BuilderRequest)
        return S.json_response(info(await b.up(req)), 201)

    async def claim(request: web.Request) -> web.Response:
        req = await S.body_as(request, BuilderRequest)
        return S.json_response(await b.claim(req))

    async def release(request: web.Request) -> web.Response:
        return S.json_response(await b.release(S.name(request)))

    router.add_get(f"{prefix}/builders", listing)
    router.add_post(f"{prefix}/builders", up)
    router.add_post(f"{prefix}/builders/claim", claim)
    router.add_post(f"{prefix}/builders/{{name}}/release", release)
