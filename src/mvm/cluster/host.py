"""The host side: one Ray actor per host, pinned to its node, in front of that host's mvmd.

The actor starts (or finds) the host's own mvmd — unchanged single-host behaviour in the
host's ``$MVM_HOME`` — reports capacity to the front, and opens a *host relay*: the mvmd
API over TCP on the host's private address for the cluster front only. The relay trusts
nothing but the cluster key (constant-time compare); names are already mapped and the
tenant headers set by the front (the same ``X-Mvm-Tenant``/``X-Mvm-Actor`` that
``mvmctl serve`` sends to mvmd), so admission and audit stay per host, in mvmd.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from mvm import errors, names

#: The header carrying the cluster key from the front (and between hosts) to a relay.
KEY_HEADER = "X-Mvm-Cluster-Key"
#: Request headers a relay passes on to mvmd.
_PASS = ("content-type", "accept", "x-mvm-tenant", "x-mvm-actor")


def mem_available_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def warm_shapes(home: Path) -> list[str]:
    """``image/cpus/memory_mb`` of each boot template in ``home`` (placement's locality)."""
    from mvm.templates import TemplateStore

    out = []
    for t in TemplateStore(home / "templates").all():
        try:
            m = t.meta
            out.append(f"{m['image']}/{int(str(m['cpus']))}/{int(str(m['memory_mb']))}")
        except (OSError, ValueError, KeyError):
            continue
    return sorted(set(out))


class HostAgent:
    """Wrapped with ``ray.remote`` by :mod:`mvm.cluster.front` (Ray stays optional here)."""

    def __init__(self, name: str, home: str | None, key: str, bind: str = "127.0.0.1") -> None:
        self.name = name
        if home:
            os.environ["MVM_HOME"] = home
        os.environ.pop("MVM_URL", None)  # this host's own mvmd, never another server
        os.environ.pop("MVM_TOKEN", None)
        from mvm import paths

        self.home = paths.home()
        self.key = key
        self.bind = bind
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._up: Any = None

    async def start(self) -> dict[str, Any]:
        """Start mvmd if needed and the relay; return where the relay listens."""
        from mvm import client
        from mvm.serve.upstream import Upstream

        await asyncio.to_thread(_ensure_daemon)
        self._up = Upstream(str(client.socket_path()))
        app = web.Application(client_max_size=64 << 20 | 1 << 16)
        app.router.add_get("/cluster/images/{image}", self._image_manifest)
        app.router.add_get("/cluster/images/{image}/file", self._image_file)
        app.router.add_route("*", "/v1/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, 0)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self.url = f"http://{self.bind}:{port}"
        return await self.info()

    async def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "home": str(self.home),
            "pid": os.getpid(),
            "mvmd_pid": _daemon_pid(self.home),
        }

    async def capacity(self) -> dict[str, Any]:
        """What placement needs: free memory, vCPUs, sandboxes, images, warm templates."""
        from mvm.images.store import ImageStore

        listed = await self._mvmd_json("GET", "/sandboxes")
        status = await self._mvmd_json("GET", "/status")
        images = ImageStore(self.home).all()
        return {
            "name": self.name,
            "free_mb": mem_available_mb(),
            "vcpus": os.cpu_count() or 1,
            "running": sum(1 for s in listed if s.get("state") == "running"),
            "sandboxes": len(listed),
            "images": sorted({n for i in images for n in (i.name, *i.aliases)}),
            "image_hashes": sorted({i.rootfs_sha256 for i in images}),
            "warm": warm_shapes(self.home),
            "pool": status.get("pool", {}),
            "listed": listed,
        }

    async def stop(self, remove_sandboxes: bool) -> None:
        """Stop this host's mvmd (and first its sandboxes, for a simulated local host)."""
        from mvm import client

        def _stop() -> None:
            with client.Client(autostart=False) as c:
                if remove_sandboxes:
                    for s in c.list_sandboxes():
                        try:
                            c.down(s.name)
                        except Exception:
                            pass
                c.shutdown()

        try:
            await asyncio.to_thread(_stop)
        except Exception:
            pass
        if self._runner is not None:
            await self._runner.cleanup()

    async def image_hash(self, image: str) -> str | None:
        """The rootfs SHA-256 of ``image`` here (None: not here)."""
        from mvm.images.store import ImageStore

        for img in ImageStore(self.home).all():
            if image in (img.name, *img.aliases):
                return img.rootfs_sha256
        return None

    async def import_image(self, src_url: str, image: str) -> dict[str, Any]:
        from mvm.cluster.images import pull_image
        from mvm.images.store import ImageStore

        return await pull_image(ImageStore(self.home), src_url, self.key, image)

    async def _image_manifest(self, request: web.Request) -> web.StreamResponse:
        from mvm.cluster.images import manifest
        from mvm.images.store import ImageStore

        if not self._authorized(request):
            return web.json_response({"code": 401, "message": "unauthorized"}, status=401)
        image = request.match_info["image"]
        if not names.is_valid("image", image):
            raise web.HTTPNotFound()
        try:
            man = await asyncio.to_thread(manifest, ImageStore(self.home), image)
        except errors.MvmError:
            raise web.HTTPNotFound() from None
        return web.json_response(man)

    async def _image_file(self, request: web.Request) -> web.StreamResponse:
        from mvm.cluster.images import source_file
        from mvm.images.store import ImageStore

        if not self._authorized(request):
            return web.json_response({"code": 401, "message": "unauthorized"}, status=401)
        image = request.match_info["image"]
        try:
            f = source_file(
                ImageStore(self.home),
                image,
                request.query.get("kind", ""),
                request.query.get("rel", ""),
            )
        except errors.MvmError:
            raise web.HTTPNotFound() from None
        return web.FileResponse(f)

    def _authorized(self, request: web.Request) -> bool:
        got = request.headers.get(KEY_HEADER, "")
        return hmac.compare_digest(got.encode(), self.key.encode())

    async def _mvmd_json(self, method: str, path: str) -> Any:
        import msgspec

        raw = await self._up.call(_OWNER, method, path, timeout=60.0)
        return msgspec.json.decode(raw)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"code": 401, "message": "unauthorized"}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS}
        data = request.content if request.can_read_body else None
        path = "/" + request.match_info.get("tail", "")
        async with await self._up.open(
            request.method, path, params=request.query, data=data, headers=headers
        ) as up:
            ctype = up.headers.get("content-type", "application/octet-stream")
            resp = web.StreamResponse(status=up.status, headers={"content-type": ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp


def _ensure_daemon() -> None:
    from mvm import client

    with client.Client() as c:
        c.ensure_daemon()


def _daemon_pid(home: Path) -> int | None:
    from mvm import client

    try:
        with client.Client(autostart=False) as c:
            st = c.ping()
    except Exception:
        return None
    return st.pid if st is not None else None


class _Owner:
    """The host owner's identity for the actor's own reads of its mvmd."""

    tenant = "default"
    token_id = "cluster"


_OWNER: Any = _Owner()
