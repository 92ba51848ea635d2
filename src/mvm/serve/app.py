"""`mvmctl serve`: mvm's API over TCP, every request behind a token.

An adapter: authenticate (bearer token, ``X-API-Key`` or ``X-Access-Token``) → tenant
→ forward to the service (mvmd on its Unix socket) with the tenant's names. Failed
authentication is a bare 401; each source address is rate-limited (429), bodies are
bounded (413) and so is the number of requests in flight (429 beyond it). It writes no
audit record of its own: each request reaches mvmd with the tenant and the token id
(``X-Mvm-Tenant``/``X-Mvm-Actor``), and the service records what it does in the
tenant's chain with the token id as actor, as it does for every caller.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from mvm import audit, client, errors
from mvm.api import models as M
from mvm.daemon.server import error_body, http_error_body, json_response
from mvm.serve.limits import RateLimiter
from mvm.serve.native import NativeRelay
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity, TokenStore

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Requests served at once, in all and per tenant (one tenant cannot take every slot);
#: beyond them, 429.
MAX_INFLIGHT = 256
MAX_INFLIGHT_TENANT = 200
#: Requests a second per source address (and the burst it may save up).
RATE, BURST = 200.0, 400.0
#: Failed authentications per address: one a second, twenty in a burst.
FAIL_RATE, FAIL_BURST = 1.0, 20.0
IDENT_KEY = web.RequestKey("ident", Identity)
E2B_HEADER = "E2b-Sandbox-Id"


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-API-Key") or request.headers.get("X-Access-Token")


def _plain(status: int, text: str) -> web.Response:
    return web.json_response({"code": status, "message": text}, status=status)


class Server:
    def __init__(self, upstream: Upstream, tokens: TokenStore | None = None) -> None:
        self.up = upstream
        self.tokens = tokens or TokenStore()
        self.rate = RateLimiter(RATE, BURST)
        self.fails = RateLimiter(FAIL_RATE, FAIL_BURST)
        self.inflight = 0
        self.per_tenant: Counter[str] = Counter()
        self.native = NativeRelay(upstream)

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Limits, then authentication, before anything else runs."""
        addr = request.remote or "?"
        now = time.monotonic()
        if self.inflight >= MAX_INFLIGHT or not self.rate.take(addr, now):
            return _plain(429, "too many requests")
        if not self.fails.has(addr, now):
            return _plain(429, "too many requests")
        length = request.content_length
        if length is not None and length > M.MAX_BODY + 1024:
            return _plain(413, "request body too large")
        ident = self.tokens.verify(bearer(request))
        if ident is None:
            self.fails.take(addr, now)
            return _plain(401, "unauthorized")
        if self.per_tenant[ident.tenant] >= MAX_INFLIGHT_TENANT:
            return _plain(429, "too many requests")
        request[IDENT_KEY] = ident
        self.inflight += 1
        self.per_tenant[ident.tenant] += 1
        try:
            resp = await handler(request)
        finally:
            self.inflight -= 1
            self.per_tenant[ident.tenant] -= 1
            if not self.per_tenant[ident.tenant]:
                del self.per_tenant[ident.tenant]
        return resp

    @web.middleware
    async def errors_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """mvm errors as the same JSON bodies mvmd sends, the tenant's prefix taken out."""
        from mvm import tenancy

        try:
            return await handler(request)
        except errors.MvmError as exc:
            ident = request.get(IDENT_KEY)
            body = error_body(exc)
            if ident is not None:
                body.message = tenancy.unprefix_text(ident.tenant, body.message)
                body.data = {
                    k: tenancy.unprefix_text(ident.tenant, v) if isinstance(v, str) else v
                    for k, v in body.data.items()
                }
            return json_response(body, errors.http_status(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_response(http_error_body(exc.status, exc.reason, request), exc.status)

    async def native_route(self, request: web.Request) -> web.StreamResponse:
        ident = request[IDENT_KEY]
        if "sandboxes" not in ident.scopes:
            return _plain(403, "this token may not use the native API")
        return await self.native.handle(request, ident)

    def app(self) -> web.Application:
        from mvm.e2b.routes import E2BFace

        app = web.Application(
            middlewares=[self.guard, self.errors_mw], client_max_size=M.MAX_BODY + 1024
        )
        E2BFace(self.up).install(app)
        app.router.add_route("*", f"/{M.API_VERSION}/{{tail:.*}}", self.native_route)
        app.on_cleanup.append(lambda _app: self.up.close())
        return app


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.InvalidArgument(f"invalid --listen {listen!r}", hint="use HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def run_server(
    listen: str,
    *,
    allow_wildcard: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    """Serve until stopped (SIGINT/SIGTERM). mvmd is started if it is not running."""
    host, port = parse_listen(listen)
    if is_wildcard(host):
        if not allow_wildcard:
            raise errors.PolicyDenied(
                f"{host} listens on every interface",
                hint="pass --allow-wildcard if that is what you want (it is audited)",
            )
        audit.record("serve.listen_wildcard", actor="mvmctl", host=host, port=port)
    if (tls_cert is None) != (tls_key is None):
        raise errors.InvalidArgument("--tls-cert and --tls-key go together")
    ctx = None
    if tls_cert is not None and tls_key is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls_cert, tls_key)
    # The server talks to its own mvmd, never to another server.
    os.environ.pop("MVM_URL", None)
    with client.Client() as c:
        c.ensure_daemon()
    server = Server(Upstream(str(client.socket_path())))
    print(f"mvm serve: listening on {'https' if ctx else 'http'}://{host}:{port}", flush=True)
    web.run_app(server.app(), host=host, port=port, ssl_context=ctx, print=None, access_log=None)
