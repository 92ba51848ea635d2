"""OCI image layouts and ``docker save`` archives: read, validate, unpack with whiteouts.

Standard library only, because this file runs *inside the builder VM* (copied in next to
the agent): layers are untrusted tars and are only ever unpacked there. Every member is
checked before it touches the tree: no absolute names or ``..``, no device nodes, FIFOs
or sparse files, bounded sizes and counts, and nothing is ever written *through* a link
(a parent that is a symlink is an escape attempt and is refused). The first bad member
stops the import with an ``OciError`` naming the layer and the member.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import sys
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

MAX_JSON = 1 << 20
MAX_LAYERS = 128
MAX_MEMBERS = 500_000
MAX_NAME = 4096
DEFAULT_MAX_BYTES = 8 << 30
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class OciError(Exception):
    """The archive is not an image this builder accepts (message says which part, why)."""


@dataclass
class ImageConfig:
    """What the image's config says about running it (kept in the mvm image record).
    An empty ``workdir``/``user`` means the image names none (mvm's defaults apply)."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Archive:
    config: ImageConfig
    layers: list[str]  # member names in the outer tar, bottom first


def _json(tar: tarfile.TarFile, name: str) -> Any:
    try:
        m = tar.getmember(name)
    except KeyError:
        raise OciError(f"the archive has no {name}") from None
    if not m.isfile() or m.size > MAX_JSON:
        raise OciError(f"{name} is not a file of at most {MAX_JSON} bytes")
    f = tar.extractfile(m)
    assert f is not None
    try:
        return json.loads(f.read())
    except (ValueError, UnicodeDecodeError):
        raise OciError(f"{name} is not valid JSON") from None


def _blob(digest: Any) -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise OciError(f"unsupported digest {digest!r}: only sha256 blobs")
    hexd = digest.removeprefix("sha256:")
    if len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise OciError(f"malformed digest {digest!r}")
    return f"blobs/sha256/{hexd}"


def _pick_oci_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    index = _json(tar, "index.json")
    for _ in range(4):  # an index may point at a nested index
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not manifests:
            raise OciError("index.json lists no manifests")
        chosen = None
        for d in manifests:
            plat = d.get("platform") if isinstance(d, dict) else None
            if plat is None or (plat.get("os"), plat.get("architecture")) == ("linux", "amd64"):
                chosen = d
                break
        if chosen is None:
            raise OciError("the archive has no linux/amd64 image")
        doc = _json(tar, _blob(chosen.get("digest")))
        if isinstance(doc, dict) and "layers" in doc:
            return doc
        index = doc
    raise OciError("index.json nests too deeply")


def read_archive(tar: tarfile.TarFile) -> Archive:
    """The config and layer names of an OCI layout or a ``docker save`` archive."""
    names = set(tar.getnames()[:100_000])
    if "index.json" in names and "oci-layout" in names:
        manifest = _pick_oci_manifest(tar)
        config = _json(tar, _blob(manifest.get("config", {}).get("digest")))
        layers = [_blob(layer.get("digest")) for layer in manifest.get("layers", [])]
    elif "manifest.json" in names:
        doc = _json(tar, "manifest.json")
        if not isinstance(doc, list) or len(doc) != 1 or not isinstance(doc[0], dict):
            raise OciError("manifest.json must describe exactly one image")
        cfg_name, raw_layers = doc[0].get("Config"), doc[0].get("Layers")
        if not isinstance(cfg_name, str) or not isinstance(raw_layers, list):
            raise OciError("manifest.json lacks Config or Layers")
        config = _json(tar, cfg_name)
        if not all(isinstance(x, str) for x in raw_layers):
            raise OciError("manifest.json Layers must be names")
        layers = [member_path(x) for x in raw_layers]
    else:
        raise OciError(
            "neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)"
        )
    if not isinstance(config, dict):
        raise OciError("the image config is not an object")
    if (config.get("os", "linux"), config.get("architecture", "amd64")) != ("linux", "amd64"):
        raise OciError(
            f"the image is {config.get('os')}/{config.get('architecture')}, not linux/amd64"
        )
    if len(layers) > MAX_LAYERS:
        raise OciError(f"more than {MAX_LAYERS} layers")
    return Archive(_config(config.get("config") or {}), layers)


def _strs(v: Any) -> list[str]:
    return [x for x in v if isinstance(x, str)][:256] if isinstance(v, list) else []


def _config(c: dict[str, Any]) -> ImageConfig:
    env = {}
    for item in _strs(c.get("Env")):
        k, eq, v = item.partition("=")
        if eq and k:
            env[k] = v
    user = c.get("User") if isinstance(c.get("User"), str) else ""
    wd = c.get("WorkingDir") if isinstance(c.get("WorkingDir"), str) else ""
    return ImageConfig(env, str(wd), str(user), _strs(c.get("Cmd")), _strs(c.get("Entrypoint")))


def member_path(name: str) -> str:
    """A member's path relative to the root, or OciError: no absolute names, no ``..``."""
    if len(name) > MAX_NAME or "\0" in name:
        raise OciError(f"{name[:80]!r}: bad name")
    if name.startswith("/"):
        raise OciError(f"{name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OciError(f"{name!r}: '..' in path")
    return "/".join(parts)


@dataclass
class Unpacker:
    """Applies layers, bottom first, to ``root`` (a directory the builder owns)."""

    root: str
    max_bytes: int = DEFAULT_MAX_BYTES
    written: int = 0
    members: int = 0

    def _parent(self, rel: str) -> str:
        """The real parent directory of ``rel``; refuses to go through a link."""
        cur = self.root
        for part in rel.split("/")[:-1]:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise OciError(f"{rel!r}: would be written through the link {part!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise OciError(f"{rel!r}: a parent is not a directory")
        return cur

    def _clear(self, path: str, keep_dir: bool) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                shutil.rmtree(path)
        else:
            os.unlink(path)

    def apply(self, layer: IO[bytes], label: str) -> None:
        try:
            with tarfile.open(fileobj=layer, mode="r|*") as tar:
                for m in tar:
                    try:
                        self._member(tar, m)
                    except OciError as exc:
                        raise OciError(f"layer {label}: {exc}") from None
        except tarfile.TarError as exc:
            raise OciError(f"layer {label}: not a readable tar ({exc})") from None

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise OciError(f"more than {MAX_MEMBERS} entries")
        rel = member_path(m.name)
        if not rel:
            return  # the root itself
        base = posixpath.basename(rel)
        if base.startswith(WHITEOUT):
            parent = self._parent(rel)
            if base == OPAQUE:
                for entry in os.listdir(parent):
                    self._clear(os.path.join(parent, entry), keep_dir=False)
            else:
                self._clear(os.path.join(parent, base.removeprefix(WHITEOUT)), keep_dir=False)
            return
        if m.issparse():
            raise OciError(f"{m.name!r}: sparse files are not accepted")
        if (
            m.ischr()
            or m.isblk()
            or m.isfifo()
            or not (m.isfile() or m.isdir() or m.issym() or m.islnk())
        ):
            raise OciError(f"{m.name!r}: device nodes, FIFOs and special files are not accepted")
        path = os.path.join(self._parent(rel), base)
        if m.isdir():
            self._clear(path, keep_dir=True)
            if not os.path.lexists(path):
                os.mkdir(path, 0o700)
        elif m.issym():
            if len(m.linkname) > MAX_NAME or "\0" in m.linkname:
                raise OciError(f"{m.name!r}: bad link target")
            self._clear(path, keep_dir=False)
            os.symlink(m.linkname, path)
        elif m.islnk():
            target_rel = member_path(m.linkname)
            target = os.path.join(self._parent(target_rel), posixpath.basename(target_rel))
            st = os.lstat(target) if os.path.lexists(target) else None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise OciError(
                    f"{m.name!r}: hard link to {m.linkname!r}, which is not a file in the image"
                )
            self._clear(path, keep_dir=False)
            os.link(target, path, follow_symlinks=False)
            return
        else:
            self.written += m.size
            if self.written > self.max_bytes:
                raise OciError(f"{m.name!r}: the image is larger than {self.max_bytes} bytes")
            self._clear(path, keep_dir=False)
            src = tar.extractfile(m)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.lchown(path, m.uid, m.gid)
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


def import_archive(
    archive: IO[bytes], root: str, max_bytes: int = DEFAULT_MAX_BYTES
) -> ImageConfig:
    """Unpack the image in ``archive`` (an uncompressed tar, seekable) into ``root``."""
    try:
        outer = tarfile.open(fileobj=archive, mode="r:")  # noqa: SIM115 (closed below)
    except tarfile.TarError as exc:
        raise OciError(f"not a tar archive ({exc})") from None
    with outer:
        arch = read_archive(outer)
        unpacker = Unpacker(root, max_bytes)
        for name in arch.layers:
            try:
                member = outer.getmember(name)
            except KeyError:
                raise OciError(f"layer {name} is missing from the archive") from None
            f = outer.extractfile(member)
            if f is None:
                raise OciError(f"layer {name} is not a file")
            unpacker.apply(f, name)
    return arch.config


def main(argv: list[str]) -> int:
    """In the builder: ``python3 oci.py ARCHIVE_DEVICE ROOT MAX_BYTES``; prints the config."""
    src, root, limit = argv[0], argv[1], int(argv[2])
    try:
        with open(src, "rb") as f:
            cfg = import_archive(f, root, limit)
    except OciError as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    print(json.dumps({"config": cfg.to_json()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
