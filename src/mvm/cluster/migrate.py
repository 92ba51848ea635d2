"""Moving a running sandbox to another host, name kept.

The sandbox is paused on its host, its whole state — memory (so the writable layer,
which is a tmpfs in guest RAM, and every process) plus devices, QEMU's migration stream
— is saved as a snapshot there, copied over TCP from the source host's relay to the
destination host (cluster key, every file verified by SHA-256 before use), registered
in the destination's mvmd and recreated there under the same name; the source sandbox
is removed. The image is checked present on both by content hash first. The pause is
from the source's stop to the destination answering; both are measured and returned.

This is stop-and-copy of QEMU's migration stream, not pre-copy: the guest stands still
for the whole copy (see docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from mvm import errors, names
from mvm.cluster.host import KEY_HEADER

#: The files of a snapshot directory a migration copies.
FILES = ("state", "snapshot.json")
CHUNK = 1 << 20


def file_hashes(d: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in FILES:
        h = hashlib.sha256()
        size = 0
        with (d / f).open("rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        out[f] = {"sha256": h.hexdigest(), "size": size}
    return out


async def pull_snapshot(
    src_url: str, key: str, sandbox: str, snap: str, want: dict[str, dict[str, Any]]
) -> Path:
    """Copy a snapshot from the source relay into this host's snapshot store, verified,
    and register it with this host's state database (mvmd reads it from there)."""
    from mvm import paths, state
    from mvm.service.snapshots import snapshots_dir

    names.check("sandbox", sandbox)
    names.check("snapshot", snap)
    dest = snapshots_dir() / sandbox / snap
    tmp = dest.with_name(f".in-{snap}")
    tmp.mkdir(parents=True, exist_ok=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=120.0)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for f in FILES:
            h = hashlib.sha256()
            size = 0
            url = f"{src_url}/cluster/snapshots/{sandbox}/{snap}/{f}"
            async with s.get(url, headers={KEY_HEADER: key}) as r:
                if r.status != 200:
                    raise errors.MvmError(f"source host answered {r.status} for {f}")
                with (tmp / f).open("wb") as out:
                    async for chunk in r.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > int(want[f]["size"]):
                            raise errors.MvmError(f"{f} is larger than announced")
                        h.update(chunk)
                        out.write(chunk)
            if h.hexdigest() != want[f]["sha256"] or size != int(want[f]["size"]):
                raise errors.MvmError(f"{f} does not match its hash: refused")
    srec = msgspec.json.decode((tmp / "snapshot.json").read_bytes(), type=state.SnapshotRecord)
    if srec.sandbox != sandbox or srec.name != snap:
        raise errors.MvmError("the snapshot record names another sandbox: refused")
    tmp.rename(dest)
    srec = msgspec.structs.replace(srec, path=str(dest))
    (dest / "snapshot.json").write_bytes(msgspec.json.encode(srec))
    db = state.StateDB(paths.home() / "state.db")
    db.add_snapshot(srec)
    return dest


def new_snapshot_name() -> str:
    return f"migrate-{secrets.token_hex(4)}"


async def migrate(
    up: Any, headers: dict[str, str], name: str, src: str, dst: str
) -> dict[str, Any]:
    """Move sandbox ``name`` (mvmd's name) from host ``src`` to ``dst``; see the module doc."""
    reg = up.reg
    s_host, d_host = reg.hosts[src], reg.hosts[dst]
    info = await _call(up, src, "GET", f"/sandboxes/{name}", headers)
    img = await s_host.actor.image_hash.remote(str(info["image"]))
    have = d_host.report.get("image_hashes", [])
    if img is None or img not in have:
        raise errors.MvmError(
            f"host {dst} lacks image {info['image']} (sha256 {img})",
            hint="build or copy the image there first",
        )
    snap = new_snapshot_name()
    t0 = time.monotonic()
    paused = info.get("state") == "running"
    if paused:
        await _call(up, src, "POST", f"/sandboxes/{name}/pause", headers)
    t_pause = time.monotonic()
    moved = False
    try:
        await _call(up, src, "POST", f"/sandboxes/{name}/snapshots", headers, {"name": snap})
        want = await s_host.actor.snapshot_files.remote(name, snap)
        await d_host.actor.import_snapshot.remote(s_host.url, name, snap, want)
        reg.pending.add(name)
        await _call(up, dst, "POST", f"/sandboxes/{name}/snapshots/{snap}/restore", headers)
        moved = True
        reg.owner[name] = dst
        t_resumed = time.monotonic()
    finally:
        reg.pending.discard(name)
        if not moved and paused:
            await _call(up, src, "POST", f"/sandboxes/{name}/resume", headers)
    await _call(up, src, "DELETE", f"/sandboxes/{name}", headers)
    for host in (src, dst):
        try:
            await _call(up, host, "DELETE", f"/sandboxes/{name}/snapshots/{snap}", headers)
        except errors.MvmError:
            pass
    reg.hosts[src].sandboxes.pop(name, None)
    return {
        "name": name,
        "from": src,
        "to": dst,
        "pause_seconds": round(t_resumed - t_pause, 3),
        "total_seconds": round(time.monotonic() - t0, 3),
        "state_bytes": int(want["state"]["size"]),
    }


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
