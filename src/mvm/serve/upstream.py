"""The service behind `mvmctl serve`: mvmd on its Unix socket, reached with aiohttp.

Every call carries ``X-Mvm-Tenant`` and ``X-Mvm-Actor`` so that an mvmd which trusts
them on its own socket can audit into the tenant's chain; names are already mapped by
the caller (:mod:`mvm.tenancy`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec

from mvm import client, errors
from mvm.api import models as M
from mvm.tokens import Identity

TENANT_HEADER = "X-Mvm-Tenant"
ACTOR_HEADER = "X-Mvm-Actor"


def error_from(status: int, body: bytes) -> errors.MvmError:
    try:
        return client.error_from_body(msgspec.json.decode(body, type=M.ErrorBody))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return errors.MvmError(f"mvmd answered HTTP {status}")


def _ensure_daemon() -> None:
    with client.Client() as c:
        c.ensure_daemon()


class Upstream:
    """One connection pool to mvmd, shared by every request of the server."""

    def __init__(self, socket: str, *, autostart: bool = True) -> None:
        self.socket = socket
        self.autostart = autostart
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket, limit=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
            )
        return self._session

    async def open(self, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
        """Send one request to mvmd; if mvmd is not there (stopped, restarting), start it
        (sandboxes keep running through that) and try once more."""
        for attempt in (1, 2):
            try:
                return await self.session.request(method, self.url(path), **kw)
            except (aiohttp.ClientConnectorError, FileNotFoundError):
                if attempt == 2 or not self.autostart:
                    break
                await asyncio.to_thread(_ensure_daemon)
        raise errors.MvmError("mvmd is not answering", hint="see $MVM_HOME/mvmd.log on the server")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def url(path: str) -> str:
        return f"http://mvmd/{M.API_VERSION}{path}"

    @staticmethod
    def headers(ident: Identity, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {TENANT_HEADER: ident.tenant, ACTOR_HEADER: ident.token_id, **(extra or {})}

    async def call(
        self,
        ident: Identity,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        params: dict[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> bytes:
        """One request; the body on success, the mvm error (raised) otherwise."""
        body = msgspec.json.encode(json) if json is not None else data
        extra = {"content-type": "application/json"} if json is not None else {}
        q = {k: str(v) for k, v in (params or {}).items()}
        async with await self.open(
            method,
            path,
            data=body,
            params=q,
            headers=self.headers(ident, extra),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise error_from(resp.status, raw)
            return raw

    async def typed(self, typ: type[Any], *args: Any, **kw: Any) -> Any:
        return msgspec.json.decode(await self.call(*args, **kw), type=typ)
