"""mvmd's side of tenancy: requests `mvmctl serve` relays carry the tenant and token id.

``X-Mvm-Tenant`` / ``X-Mvm-Actor`` are trusted only because mvmd's socket is its
owner's alone (0600): whoever can send them can already do anything. With them, a
request may only name the tenant's own sandboxes (anything else is "not found"), and
every audit record made while serving it goes to the tenant's chain with the token id
as actor. Without a tenant (the owner's own ``mvmctl``, SDK, ``mvmctl mcp``), an
``X-Mvm-Actor`` alone names who acts for the owner (``MVM_ACTOR``, ``Client(actor=)``,
``mcp:<client>``): the service's audit records of the request carry it instead of
``mvmd``. mvmd writes every audit record itself; the adapters write none.

Hook: add :func:`tenant_middleware` to mvmd's aiohttp middlewares, after the error
middleware (so its SandboxNotFound becomes the usual 404).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from mvm import names, tenancy
from mvm.audit.log import ACTOR_RE, acting_for, labelled
from mvm.errors import InvalidArgument, SandboxNotFound

TENANT_HEADER = "X-Mvm-Tenant"
ACTOR_HEADER = "X-Mvm-Actor"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def tenant_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    raw = request.headers.get(TENANT_HEADER)
    if raw is None:
        label = request.headers.get(ACTOR_HEADER)
        if label is None:
            return await handler(request)
        if not ACTOR_RE.fullmatch(label):
            raise InvalidArgument(f"invalid {ACTOR_HEADER} {label[:80]!r}")
        with labelled(label):
            return await handler(request)
    tenant = names.check("tenant", raw)
    actor = names.check("token", request.headers.get(ACTOR_HEADER, ""))
    name = request.match_info.get("name")
    if name is not None and not tenancy.owns(tenant, name):
        raise SandboxNotFound(f"sandbox {name} not found", name=name)
    with acting_for(tenant, actor):
        return await handler(request)
