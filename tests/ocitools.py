"""Make OCI image layouts and docker-save archives in tests (no registry)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Member:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    size: int | None = None  # a lie about the size, for hostile layers


@dataclass
class Layer:
    members: list[Member] = field(default_factory=list)


def layer_bytes(layer: Layer) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in layer.members:
            ti = tarfile.TarInfo(m.name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.linkname = m.kind, m.mode, m.uid, m.gid, m.link
            ti.mtime = 1_600_000_000
            if m.kind == tarfile.REGTYPE:
                ti.size = len(m.data)
                tar.addfile(ti, io.BytesIO(m.data))
            else:
                if m.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    ti.devmajor, ti.devminor = 1, 3
                tar.addfile(ti)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 1_600_000_000
    tar.addfile(ti, io.BytesIO(data))


def write_oci(path: Path, layers: list[Layer], config: dict[str, object], gz: bool = True) -> Path:
    """An OCI image layout, as a tar, at ``path``."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return f"sha256:{d}"

    layer_descs = []
    for layer in layers:
        raw = layer_bytes(layer)
        data = gzip.compress(raw, mtime=0) if gz else raw
        layer_descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": blob(data),
                "size": len(data),
            }
        )
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()
    manifest = {
        "schemaVersion": 2,
        "config": {"digest": blob(cfg), "size": len(cfg)},
        "layers": layer_descs,
    }
    mdata = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "digest": blob(mdata),
                "size": len(mdata),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        for d, data in sorted(blobs.items()):
            _add(tar, f"blobs/sha256/{d}", data)
    return path


def write_docker_save(path: Path, layers: list[Layer], config: dict[str, object]) -> Path:
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()
    with tarfile.open(path, "w") as tar:
        names = []
        for i, layer in enumerate(layers):
            names.append(f"l{i}/layer.tar")
            _add(tar, names[-1], layer_bytes(layer))
        _add(tar, "config.json", cfg)
        _add(
            tar, "manifest.json", json.dumps([{"Config": "config.json", "Layers": names}]).encode()
        )
    return path
