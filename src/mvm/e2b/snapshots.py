"""E2B's snapshot and fork routes over mvm's snapshot and fork verbs.

- ``POST /sandboxes/{id}/snapshots`` (``create_snapshot``): an mvm snapshot of the
  sandbox, which keeps running. Its E2B id is ``<sandbox id>:<snapshot name>``.
- ``GET /snapshots`` (``list_snapshots``), ``DELETE /templates/{snapshot id}``
  (``delete_snapshot``).
- ``POST /v2/sandboxes`` with such an id as ``templateID``: the snapshot restored as a new
  sandbox (mvm's ``restore-as``), memory and processes included.
- ``POST /sandboxes/{id}/fork`` (``fork``): mvm's fork, ``count`` children from one
  snapshot of the running source.

Only memory snapshots exist in mvm: the ``memory: false`` (filesystem-only) variants are
refused with a clear 400, never quietly taken as full ones.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

from aiohttp import web

from mvm import errors, names, tenancy
from mvm.api import fork as F
from mvm.api import models as M
from mvm.e2b.control import DEFAULT_TIMEOUT, _timeout, created_view, page
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity

SEP: Final = ":"


def snapshot_id(sid: str, snap: str) -> str:
    return f"{sid}{SEP}{snap}"


def parse_snapshot_id(ident: Identity, value: str) -> tuple[str, str] | None:
    """``(mvmd's sandbox name, snapshot name)`` for an E2B snapshot id of the tenant's,
    None when ``value`` is not a snapshot id (an image or template name)."""
    sid, sep, snap = value.partition(SEP)
    if not sep:
        return None
    if not names.is_valid("snapshot", snap):
        raise errors.SnapshotNotFound(f"snapshot {value} not found")
    return tenancy.sandbox_for(ident.tenant, sid), snap


def no_filesystem_only(body: dict[str, Any], what: str) -> None:
    if body.get("memory") is False:
        raise errors.InvalidArgument(
            f"filesystem-only {what} is not supported by mvm",
            hint="mvm keeps memory and files: omit mode/keep_memory (a full one)",
        )


def _snap_view(sid: str, snap: str) -> dict[str, Any]:
    full = snapshot_id(sid, snap)
    return {"snapshotID": full, "names": [full]}


class Snapshots:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    async def create(self, ident: Identity, sid: str, body: dict[str, Any]) -> web.Response:
        no_filesystem_only(body, "snapshot")
        name = tenancy.sandbox_for(ident.tenant, sid)
        snap = body.get("name") or f"snap-{secrets.token_hex(4)}"
        if not names.is_valid("snapshot", snap):
            names.check("snapshot", snap)  # raises, naming the rule
        req = M.SnapshotRequest(name=str(snap))
        await self.up.call(ident, "POST", f"/sandboxes/{name}/snapshots", json=req, timeout=600)
        return web.json_response(_snap_view(sid, str(snap)), status=201)

    async def list(self, ident: Identity, query: Any) -> web.Response:
        """The tenant's snapshots: of one sandbox (``sandboxID``, also one that was killed)
        or of every sandbox it has now; ``name`` keeps those whose id or name is it."""
        wanted = str(query.get("sandboxID", ""))
        if wanted:
            sids = [wanted]
        else:
            listed = await self.up.typed(list[M.SandboxInfo], ident, "GET", "/sandboxes")
            sids = sorted(
                tenancy.from_service(ident.tenant, i.name)
                for i in listed
                if tenancy.owns(ident.tenant, i.name)
            )
        out: list[dict[str, Any]] = []
        for sid in sids:
            name = tenancy.sandbox_for(ident.tenant, sid)
            try:
                snaps = await self.up.typed(
                    list[M.SnapshotInfo], ident, "GET", f"/sandboxes/{name}/snapshots"
                )
            except errors.SandboxNotFound:
                continue
            out.extend(_snap_view(sid, s.name) for s in sorted(snaps, key=lambda s: s.created))
        key = str(query.get("name", ""))
        if key:
            out = [s for s in out if key in (s["snapshotID"], s["snapshotID"].split(SEP)[1])]
        items, nxt = page(out, query.get("limit"), query.get("nextToken"))
        return web.json_response(items, headers={"x-next-token": nxt} if nxt else None)

    async def delete(self, ident: Identity, template: str) -> web.Response:
        """``DELETE /templates/{id}``: a snapshot id removes that snapshot; mvm has no
        other templates to delete through E2B (404, which the SDK reports as False)."""
        try:
            parsed = parse_snapshot_id(ident, template)
        except errors.MvmError:
            parsed = None
        if parsed is None:
            raise errors.SnapshotNotFound(f"template {template} not found")
        name, snap = parsed
        await self.up.call(ident, "DELETE", f"/sandboxes/{name}/snapshots/{snap}")
        return web.Response(status=204)

    async def restore(
        self, ident: Identity, src: tuple[str, str], body: dict[str, Any], token: str
    ) -> web.Response:
        """``Sandbox.create(<snapshot id>)``: the snapshot as a new sandbox."""
        if body.get("envVars") or body.get("metadata"):
            raise errors.InvalidArgument(
                "envVars and metadata cannot be set on a sandbox made from a snapshot",
                hint="it has the snapshot's environment and metadata",
            )
        name, snap = src
        new = tenancy.new_name(ident.tenant)
        info = await self.up.typed(
            M.SandboxInfo,
            ident,
            "POST",
            f"/sandboxes/{name}/snapshots/{snap}/restore-as",
            json=F.RestoreAs(name=new),
            timeout=600,
        )
        info = await self._ttl(ident, info, body.get("timeout"))
        return web.json_response(created_view(ident, info, token), status=201)

    async def fork(
        self, ident: Identity, sid: str, body: dict[str, Any], token: str
    ) -> web.Response:
        name = tenancy.sandbox_for(ident.tenant, sid)
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int):
            raise errors.InvalidArgument("count must be an integer")
        req = F.ForkRequest(name=tenancy.new_name(ident.tenant), count=count)
        res = await self.up.typed(
            F.ForkResult, ident, "POST", f"/sandboxes/{name}/fork", json=req, timeout=900
        )
        out = []
        for child in res.children:
            child = await self._ttl(ident, child, body.get("timeout"))
            out.append({"sandbox": created_view(ident, child, token)})
        return web.json_response(out, status=201)

    async def _ttl(self, ident: Identity, info: M.SandboxInfo, timeout: object) -> M.SandboxInfo:
        if timeout is None:
            return info
        ttl = M.TtlRequest(ttl_seconds=_timeout(timeout, DEFAULT_TIMEOUT))
        out: M.SandboxInfo = await self.up.typed(
            M.SandboxInfo, ident, "POST", f"/sandboxes/{info.name}/ttl", json=ttl
        )
        return out
