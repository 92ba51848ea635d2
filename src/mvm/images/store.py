"""The image store: build (or reuse) images and find them by name, under ``MVM_HOME``.

Layout::

    kernels/<package_version>/   vmlinux, modules/, kernel.json
    rootfs/<rootfs key>.ext4     read-only, named by the hash of what went into it
    initramfs/<sha256>.cpio      busybox + modules + /init + this mvm's agent
    images/<name>.json           image records; aliases point at the same record

Every artifact is written to a temporary name and renamed into place when
complete, so an interrupted build leaves nothing that looks usable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from mvm import paths
from mvm.errors import ImageNotFound, MvmError, UnknownPreset
from mvm.fsutil import remove_tree
from mvm.images import manifest as manifests
from mvm.images.initramfs import ensure_initramfs
from mvm.images.kernel import Kernel, ensure_kernel, load_kernel
from mvm.images.manifest import Manifest
from mvm.images.rootfs import build_rootfs
from mvm.progress import NullReporter, Reporter


class Image(msgspec.Struct, frozen=True):
    """A built image: what a VM boots."""

    id: str
    name: str
    aliases: list[str]
    manifest: Manifest
    kernel_dir: str
    kernel_release: str
    rootfs: str
    rootfs_sha256: str
    rootfs_bytes: int
    built_at: float
    #: For images made by the builder VM: the source's run defaults (cmd, entrypoint, user,
    #: workdir) and the hashes of the build's inputs (see mvm.builder).
    build: dict[str, Any] = {}

    def kernel(self) -> Kernel:
        return load_kernel(Path(self.kernel_dir))

    @property
    def env(self) -> dict[str, str]:
        return dict(self.manifest.env)


def _audit_built(img: Image) -> None:
    """``image.built`` in the audit log; a failing log does not fail the build."""
    from mvm import audit

    try:
        audit.record(
            "image.built",
            actor="images",
            image=img.name,
            image_id=img.id,
            rootfs_sha256=img.rootfs_sha256,
            rootfs_bytes=img.rootfs_bytes,
            kernel=img.kernel_release,
            suite=img.manifest.suite,
            packages=len(img.manifest.packages),
        )
    except MvmError:
        pass


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.home()

    # -- locations --------------------------------------------------------------
    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def rootfs_dir(self) -> Path:
        return self.root / "rootfs"

    @property
    def initramfs_dir(self) -> Path:
        return self.root / "initramfs"

    @property
    def records(self) -> Path:
        return self.root / "images"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One build at a time per MVM_HOME (other builders wait)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "build.lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- lookup -----------------------------------------------------------------
    def all(self) -> list[Image]:
        seen: dict[str, Image] = {}
        if self.records.is_dir():
            for f in sorted(self.records.glob("*.json")):
                img = self._load(f)
                if img is not None and img.name == f.stem:
                    seen[img.name] = img
        return list(seen.values())

    def _load(self, f: Path) -> Image | None:
        try:
            img = msgspec.json.decode(f.read_bytes(), type=Image)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        if not Path(img.rootfs).is_file() or not (Path(img.kernel_dir) / "kernel.json").is_file():
            return None  # parts were removed: treat as not built
        return img

    def find(self, name: str) -> Image | None:
        f = self.records / f"{name}.json"
        if manifests.NAME_RE.fullmatch(name) and f.is_file():
            return self._load(f)
        return None

    def resolve(self, name: str) -> Image:
        img = self.find(name)
        if img is not None:
            return img
        known = sorted({i.name for i in self.all()} | {n for i in self.all() for n in i.aliases})
        presets = manifests.preset_names()
        raise ImageNotFound(
            f"image {name!r} is not built",
            hint=(
                f"built images: {', '.join(known) or 'none'}; "
                f"build one with `mvmctl build --preset NAME` (presets: {', '.join(presets)})"
            ),
            image=name,
        )

    # -- build ------------------------------------------------------------------
    def build(
        self, m: Manifest, *, reporter: Reporter | None = None, rebuild: bool = False
    ) -> Image:
        """Build the image for ``m``, reusing every cached part that is already there."""
        rep = reporter or NullReporter()
        with self.lock():
            self._clean_staging()
            existing = self.find(m.name)
            fresh = (
                existing is not None
                and existing.manifest == m
                and Path(existing.rootfs).name == f"{m.rootfs_key()}.ext4"
            )
            if existing is not None and fresh and not rebuild:
                rep.finish(f"{m.name}: cached ({existing.id[:12]})")
                return existing
            kernel = ensure_kernel(self.kernels, rep)
            rootfs = self.rootfs_dir / f"{m.rootfs_key()}.ext4"
            meta = rootfs.with_suffix(".json")
            if rebuild or not (rootfs.is_file() and meta.is_file()):
                meta.unlink(missing_ok=True)
                if rootfs.exists():
                    os.chmod(rootfs, 0o644)
                    rootfs.unlink()
                digest = build_rootfs(m, rootfs, rep)
                meta.write_text(json.dumps({"sha256": digest, "built_at": time.time()}))
            else:
                digest = json.loads(meta.read_text())["sha256"]
            ensure_initramfs(kernel, self.initramfs_dir)  # fail now rather than at launch
            img = self._record(m, kernel, rootfs, digest)
            rep.finish(f"{m.name}: built ({img.id[:12]})")
            _audit_built(img)
            return img

    def register(self, m: Manifest, rootfs: Path, digest: str, build: dict[str, Any]) -> Image:
        """Record an image whose rootfs the builder VM made (already in ``rootfs_dir``)."""
        kernel = ensure_kernel(self.kernels)
        ensure_initramfs(kernel, self.initramfs_dir)
        return self._record(m, kernel, rootfs, digest, build)

    def _record(
        self,
        m: Manifest,
        kernel: Kernel,
        rootfs: Path,
        digest: str,
        build: dict[str, Any] | None = None,
    ) -> Image:
        """Write the image record under its name and aliases; its id hashes what it is made of."""
        doc: dict[str, Any] = {
            "rootfs": digest,
            "kernel": kernel.version,
            "manifest": msgspec.to_builtins(m),
        }
        if build is not None:
            doc["build"] = build
        img = Image(
            id=hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(),
            name=m.name,
            aliases=list(m.aliases),
            manifest=m,
            kernel_dir=str(kernel.root),
            kernel_release=kernel.release,
            rootfs=str(rootfs),
            rootfs_sha256=digest,
            rootfs_bytes=rootfs.stat().st_size,
            built_at=time.time(),
            build=build if build is not None else {},
        )
        self.records.mkdir(parents=True, exist_ok=True)
        data = msgspec.json.encode(img)
        for n in [m.name, *m.aliases]:
            tmp = self.records / f".{n}.json.tmp"
            tmp.write_bytes(data)
            tmp.rename(self.records / f"{n}.json")
        return img

    def _clean_staging(self) -> None:
        """Remove what interrupted builds left (we hold the build lock, so none is running)."""
        for d in (self.kernels, self.rootfs_dir, self.initramfs_dir, self.records):
            if d.is_dir():
                for p in d.glob(".tmp*"):
                    remove_tree(p)

    def ensure(self, name: str, reporter: Reporter | None = None) -> Image:
        """The image called ``name``; a preset's image is built on first use."""
        img = self.find(name)
        if img is not None:
            return img
        try:
            m = manifests.load_preset(name)
        except UnknownPreset:
            return self.resolve(name)  # raises ImageNotFound with the list of images
        return self.build(m, reporter=reporter)

    def initramfs_for(self, img: Image) -> Path:
        path, _ = ensure_initramfs(img.kernel(), self.initramfs_dir)
        return path
