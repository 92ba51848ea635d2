"""The guest kernel: Debian's cloud kernel, fetched with the host's apt, cached by package version.

``-M microvm`` boots an uncompressed ELF ``vmlinux`` with a PVH note. Debian
ships a bzImage whose payload is LZ4 (sometimes another codec), so we cut the
payload out of the bzImage using the setup header and decompress it. The
virtio and filesystem drivers are modules; the ones the initramfs needs are
copied out, decompressed, into a flat directory with a load order.
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mvm import hostexec
from mvm.errors import ImageBuildError
from mvm.progress import NullReporter, Reporter

META_PACKAGE = "linux-image-cloud-amd64"
#: Modules the initramfs loads with busybox ``insmod``, in this order (dependencies
#: first: virtio_ring, virtio, virtio_mmio before the devices). Ones the package does
#: not ship as modules are taken to be built into the kernel.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio-rng",
    "failover",
    "net_failover",
    "virtio_net",
    "overlay",
    "vsock",
)


@dataclass(frozen=True)
class Kernel:
    """A cached, ready-to-boot kernel."""

    package: str
    version: str
    release: str  # uname -r
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    def module_order(self) -> list[str]:
        return (self.modules_dir / "order").read_text().split()


def extract_payload(bzimage: bytes) -> bytes:
    """Cut the compressed kernel payload out of a bzImage (boot protocol >= 2.08)."""
    if len(bzimage) < 0x260 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageBuildError("kernel image is not a bzImage (no HdrS header)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    end = start + payload_length
    if payload_length == 0 or end > len(bzimage):
        raise ImageBuildError("kernel image has an invalid payload offset/length")
    return bzimage[start:end]


def decompress_payload(payload: bytes, workdir: Path) -> bytes:
    """Decompress a bzImage payload, whichever codec Debian used, to the ELF vmlinux."""
    if payload[:4] == b"\x02\x21\x4c\x18":  # legacy LZ4 frame (what `lz4 -l` writes)
        src = workdir / "payload.lz4"
        # The kernel's decompressor wants the uncompressed size appended (4 bytes);
        # the lz4 tool calls that trailing garbage, so drop it.
        src.write_bytes(payload[:-4])
        out = workdir / "vmlinux.raw"
        hostexec.run(["lz4", "-dqf", str(src), str(out)], what="decompress kernel", timeout=120)
        data = out.read_bytes()
    elif payload[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(payload)
        except (OSError, EOFError) as exc:
            raise ImageBuildError(f"corrupt gzip kernel payload: {exc}") from None
    elif payload[:6] == b"\xfd7zXZ\x00":
        try:
            data = lzma.decompress(payload)
        except (lzma.LZMAError, EOFError) as exc:
            raise ImageBuildError(f"corrupt xz kernel payload: {exc}") from None
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        src = workdir / "payload.zst"
        src.write_bytes(payload[:-4])  # like lz4: the kernel appends its 4-byte size
        out = workdir / "vmlinux.raw"
        hostexec.run(
            ["zstd", "-dqf", str(src), "-o", str(out)], what="decompress kernel", timeout=120
        )
        data = out.read_bytes()
    else:
        raise ImageBuildError(f"unknown kernel compression (magic {payload[:6].hex()})")
    if data[:4] != b"\x7fELF":
        raise ImageBuildError("decompressed kernel is not an ELF file")
    return data


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        out = path.with_suffix(".raw")
        hostexec.run(
            ["zstd", "-dqf", str(path), "-o", str(out)], what="decompress module", timeout=60
        )
        return out.read_bytes()
    return data


def resolve_package() -> tuple[str, str]:
    """The concrete kernel package the meta-package points at, and its version."""
    out = hostexec.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", META_PACKAGE],
        what="apt-cache depends",
        timeout=60,
    )
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)\b", out)
    if not m:
        raise ImageBuildError(
            f"apt does not know {META_PACKAGE}",
            hint="run `apt-get update` (the host's Debian sources must be configured)",
        )
    pkg = m.group(1)
    policy = hostexec.run(["apt-cache", "policy", pkg], what="apt-cache policy", timeout=60)
    v = re.search(r"Candidate: (\S+)", policy)
    if not v or v.group(1) == "(none)":
        raise ImageBuildError(f"no installable version of {pkg}", hint="run `apt-get update`")
    return pkg, v.group(1)


def cache_key(package: str, version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", f"{package}_{version}")


def ensure_kernel(cache: Path, reporter: Reporter | None = None) -> Kernel:
    """Return the cached kernel for the current candidate version, fetching it if needed."""
    rep = reporter or NullReporter()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        package, version = resolve_package()
    except ImageBuildError:
        existing = cached_kernels(cache)
        if existing:  # offline, or apt lists gone: keep working with what we have
            return existing[-1]
        raise
    root = cache / cache_key(package, version)
    meta = root / "kernel.json"
    if meta.is_file():
        return load_kernel(root)
    rep.stage(f"kernel {package} {version}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-") as tmp_s:
        tmp = Path(tmp_s)
        rep.status("apt-get download")
        hostexec.run(
            ["apt-get", "download", package], what="apt-get download", cwd=tmp, timeout=600
        )
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ImageBuildError(f"apt-get download left {len(debs)} .deb files")
        rep.status("unpack")
        tree = tmp / "tree"
        hostexec.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], what="dpkg-deb -x", timeout=300)
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise ImageBuildError(f"{package} has no /boot/vmlinuz-*")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        rep.status("extract vmlinux")
        vmlinux = decompress_payload(extract_payload(vmlinuz[0].read_bytes()), tmp)
        out = tmp / "out"
        (out / "modules").mkdir(parents=True)
        (out / "vmlinux").write_bytes(vmlinux)
        found = _collect_modules(tree / "lib" / "modules" / release, out / "modules")
        order = [m for m in MODULES if m in found]
        (out / "modules" / "order").write_text("\n".join(order) + "\n")
        (out / "kernel.json").write_text(
            json.dumps({"package": package, "version": version, "release": release})
        )
        if root.exists():
            shutil.rmtree(root)
        out.rename(root)  # atomic: a half-built kernel never has kernel.json in place
    rep.finish(f"kernel {release}")
    return load_kernel(root)


def _collect_modules(moddir: Path, dest: Path) -> set[str]:
    wanted = set(MODULES)
    found: set[str] = set()
    if not moddir.is_dir():
        return found
    for path in moddir.rglob("*.ko*"):
        name = path.name.split(".ko", 1)[0]
        if name in wanted and name not in found:
            (dest / f"{name}.ko").write_bytes(_decompress_module(path))
            found.add(name)
    return found


def load_kernel(root: Path) -> Kernel:
    meta = json.loads((root / "kernel.json").read_text())
    return Kernel(meta["package"], meta["version"], meta["release"], root)


def cached_kernels(cache: Path) -> list[Kernel]:
    if not cache.is_dir():
        return []
    return [load_kernel(p) for p in sorted(cache.iterdir()) if (p / "kernel.json").is_file()]
