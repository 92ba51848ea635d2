"""Moving a running sandbox to another host, live, name kept: QEMU to QEMU over TCP.

The front drives the two hosts' mvmds through their relays (cluster key), as the host's
owner (``service.migration`` refuses a tenant's request: only the cluster names where a
VM's memory goes):

1. the rootfs must be on the destination by content hash (else refused, naming it);
2. the source describes the sandbox (shape, id, tenant, forwards, running processes);
3. the destination admits it as a create, opens its egress proxy and starts a QEMU of
   the same shape listening on the host's private address (``-incoming defer``,
   ``migrate-incoming tcp:ADDR:0``) with TLS and a pre-shared key;
4. the source migrates to it, pre-copy, its guest running until the last pass (QEMU's
   ``downtime`` is the pause); the key is a fresh 256-bit one per migration, made here
   and sent to both hosts over their authenticated API only;
5. the destination resumes the guest and reconnects to its agent; the name (and the id
   when free) is the same, the next call goes there; the source is removed; the
   forwards are bound again on the destination (the same port when it is free).

If the destination fails after the stream went through, the source runs again.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from mvm import errors
from mvm.serve.upstream import ACTOR_HEADER


async def migrate(
    up: Any, headers: dict[str, str], name: str, src: str, dst: str
) -> dict[str, Any]:
    """Move sandbox ``name`` (mvmd's name) from host ``src`` to ``dst``; see the module doc.
    ``headers`` are the caller's (tenant) headers, used for what a tenant may do itself
    (reading the sandbox, binding its forwards)."""
    reg = up.reg
    s_host, d_host = reg.hosts[src], reg.hosts[dst]
    owner = {ACTOR_HEADER: headers.get(ACTOR_HEADER, "cluster")}
    info = await _call(up, src, "GET", f"/sandboxes/{name}", headers)
    img = await s_host.actor.image_hash.remote(str(info["image"]))
    if img is None or img not in d_host.report.get("image_hashes", []):
        raise errors.MvmError(
            f"host {dst} lacks image {info['image']} (sha256 {img})",
            hint="build or copy the image there first",
        )
    base = f"/sandboxes/{name}/migration"
    t0 = time.monotonic()
    plan = await _call(up, src, "GET", f"{base}/plan", owner)
    key = secrets.token_hex(32)
    listen = d_host.url.split("//", 1)[-1].rsplit(":", 1)[0]
    reg.moving[name] = src
    try:
        t_in = time.monotonic()
        got = await _call(
            up, dst, "POST", f"{base}/in", owner,
            {"plan": plan, "listen": listen, "key": key, "source_host": src},
        )  # fmt: skip
        t_listening = time.monotonic()
        try:
            stats = await _call(
                up, src, "POST", f"{base}/out", owner,
                {"uri": f"tcp:{listen}:{int(got['port'])}", "key": key, "to_host": dst},
            )  # fmt: skip
        except BaseException:
            await _quietly(up, dst, f"{base}/in/abort", owner)
            raise
        del key
        t_sent = time.monotonic()
        try:
            moved = await _call(up, dst, "POST", f"{base}/in/finish", owner)
        except BaseException:
            await _quietly(up, src, f"{base}/out/abort", owner)
            raise
        t_resumed = time.monotonic()
        reg.owner[name] = dst
        reg.hosts[dst].sandboxes[name] = moved
    finally:
        reg.moving.pop(name, None)
    await _call(up, src, "POST", f"{base}/out/commit", owner, {"to_host": dst})
    reg.hosts[src].sandboxes.pop(name, None)
    forwards, warnings = await _forwards_back(up, dst, name, plan.get("forwards", []), headers)
    downtime = stats.get("downtime_ms")
    return {
        "name": name,
        "from": src,
        "to": dst,
        "id": moved.get("id"),
        "same_id": moved.get("id") == plan.get("id"),
        "pause_seconds": round(downtime / 1000, 3) if isinstance(downtime, int) else None,
        "listen_seconds": round(t_listening - t_in, 3),
        "stream_seconds": round(t_sent - t_listening, 3),
        "resume_seconds": round(t_resumed - t_sent, 3),
        "total_seconds": round(time.monotonic() - t0, 3),
        "transferred_bytes": stats.get("ram_bytes"),
        "passes": stats.get("dirty_sync_count"),
        "forwards": forwards,
        "warnings": warnings,
        "transport": "qemu migration over tcp, tls-psk (one-off key)",
    }


async def _forwards_back(
    up: Any, host: str, name: str, specs: list[dict[str, Any]], headers: dict[str, str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Bind the source's forwards on the new host (through the policy, as the tenant):
    the same port when free there, else any; what could not be bound is a warning."""
    out, warnings = [], []
    for spec in specs:
        last: errors.MvmError | None = None
        for port in dict.fromkeys((int(spec.get("host_port", 0)), 0)):
            try:
                fwd = await _call(
                    up, host, "POST", f"/sandboxes/{name}/forwards", headers,
                    {**spec, "host_port": port},
                )  # fmt: skip
                out.append(fwd)
                break
            except errors.MvmError as exc:
                last = exc
        else:
            warnings.append(
                f"forward to guest port {spec.get('guest_port')} not re-created: {last}"
            )
    return out, warnings


async def _quietly(up: Any, host: str, path: str, headers: dict[str, str]) -> None:
    try:
        await _call(up, host, "POST", path, headers)
    except Exception:  # the first failure is the one the caller sees
        pass


async def _call(
    up: Any, host: str, method: str, path: str, headers: dict[str, str], json: Any = None
) -> Any:
    from mvm.serve.upstream import error_from

    kw: dict[str, Any] = {"headers": dict(headers)}
    if json is not None:
        kw["data"] = msgspec.json.encode(json)
        kw["headers"]["content-type"] = "application/json"
    async with await up.to_host(host, method, path, **kw) as r:
        raw = await r.read()
        if r.status >= 400:
            raise error_from(r.status, raw)
        return msgspec.json.decode(raw) if raw else None
