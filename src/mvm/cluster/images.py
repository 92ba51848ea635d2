"""Images by content hash between hosts: a host lacking an image (or its kernel) gets it
from a host that has it, over the hosts' relays (cluster key), every file verified by
SHA-256 before the image record is written — the rootfs against the hash the image was
built with. A file already present with that hash is not copied again.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from mvm import errors, names
from mvm.cluster.host import KEY_HEADER
from mvm.images.store import Image, ImageStore

CHUNK = 1 << 20


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def find(store: ImageStore, image: str) -> Image | None:
    for img in store.all():
        if image in (img.name, *img.aliases):
            return img
    return None


def manifest(store: ImageStore, image: str) -> dict[str, Any]:
    """What a host must fetch to run ``image``: its record and files (rel, size, sha256)."""
    img = find(store, image)
    if img is None:
        raise errors.ImageNotFound(f"no image {image} here")
    files = [{"kind": "rootfs", "rel": Path(img.rootfs).name, "sha256": img.rootfs_sha256,
              "size": Path(img.rootfs).stat().st_size}]  # fmt: skip
    kdir = Path(img.kernel_dir)
    for f in sorted(kdir.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(kdir))
            files.append(
                {"kind": "kernel", "rel": rel, "sha256": sha256_file(f), "size": f.stat().st_size}
            )
    return {"record": msgspec.to_builtins(img), "kernel": kdir.name, "files": files}


def source_file(store: ImageStore, image: str, kind: str, rel: str) -> Path:
    """The path of one file a manifest names (anything else: not found)."""
    img = find(store, image)
    if img is None:
        raise errors.ImageNotFound(f"no image {image} here")
    if kind == "rootfs" and rel == Path(img.rootfs).name:
        return Path(img.rootfs)
    kdir = Path(img.kernel_dir).resolve()
    p = (kdir / rel).resolve()
    if kind == "kernel" and p.is_relative_to(kdir) and p.is_file():
        return p
    raise errors.ImageNotFound(f"{image} has no {kind} file {rel!r}")


async def pull_image(store: ImageStore, src_url: str, key: str, image: str) -> dict[str, Any]:
    """Fetch ``image`` from the host at ``src_url`` into ``store``; returns what was copied."""
    names.check("image", image)
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=120.0)
    hdr = {KEY_HEADER: key}
    copied = 0
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(f"{src_url}/cluster/images/{image}", headers=hdr) as r:
            if r.status != 200:
                raise errors.ImageNotFound(f"the source host has no image {image} ({r.status})")
            man = await r.json()
        kernel = str(man["kernel"])
        if "/" in kernel or kernel in ("", ".", ".."):
            raise errors.MvmError("bad kernel name in an image manifest: refused")
        for f in man["files"]:
            base = store.rootfs_dir if f["kind"] == "rootfs" else store.kernels / kernel
            dest = (base / str(f["rel"])).resolve()
            if not dest.is_relative_to(base.resolve()):
                raise errors.MvmError("an image file outside its directory: refused")
            if (
                dest.is_file()
                and dest.stat().st_size == f["size"]
                and await asyncio.to_thread(sha256_file, dest) == f["sha256"]
            ):
                continue  # present by hash
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".in-{dest.name}")
            h = hashlib.sha256()
            size = 0
            url = f"{src_url}/cluster/images/{image}/file"
            params = {"kind": f["kind"], "rel": f["rel"]}
            async with s.get(url, headers=hdr, params=params) as r:
                if r.status != 200:
                    raise errors.MvmError(f"the source host answered {r.status} for {f['rel']}")
                with tmp.open("wb") as out:
                    async for chunk in r.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > int(f["size"]):
                            raise errors.MvmError(f"{f['rel']} is larger than announced")
                        h.update(chunk)
                        out.write(chunk)
            if h.hexdigest() != f["sha256"] or size != int(f["size"]):
                tmp.unlink(missing_ok=True)
                raise errors.MvmError(f"{f['rel']} does not match its hash: refused")
            tmp.replace(dest)
            copied += size
    rec = dict(man["record"])
    rec["rootfs"] = str(store.rootfs_dir / Path(str(rec["rootfs"])).name)
    rec["kernel_dir"] = str(store.kernels / kernel)
    img = msgspec.convert(rec, type=Image)
    store.records.mkdir(parents=True, exist_ok=True)
    (store.records / f"{img.name}.json").write_bytes(msgspec.json.encode(img))
    return {"image": img.name, "bytes_copied": copied, "rootfs_sha256": img.rootfs_sha256}
