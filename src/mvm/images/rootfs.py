"""Read-only root filesystems: mmdebstrap from the host's apt sources, then ``mkfs.ext4 -d``."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from mvm import hostexec
from mvm.errors import ImageBuildError
from mvm.images import apt_sources
from mvm.images.manifest import Manifest
from mvm.progress import NullReporter, Reporter

#: UID/GID of the unprivileged user commands run as by default.
GUEST_UID = 1000
GUEST_USER = "user"

CUSTOMIZE_HOOKS = (
    f'chroot "$1" useradd --create-home --uid {GUEST_UID} --user-group --shell /bin/bash {GUEST_USER}',
    f'mkdir -p "$1/work" && chown {GUEST_UID}:{GUEST_UID} "$1/work"',
)


def mmdebstrap_argv(m: Manifest, target: Path) -> list[str]:
    """The mmdebstrap call for a manifest (pure; sources come on stdin)."""
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(m.all_packages())}",
        '--aptopt=Acquire::Retries "3"',
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
    ]
    argv += [f"--customize-hook={h}" for h in CUSTOMIZE_HOOKS]
    argv += [m.suite, str(target), "-"]
    return argv


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_rootfs(m: Manifest, out: Path, reporter: Reporter | None = None) -> str:
    """Build the ext4 root filesystem for ``m`` at ``out`` (atomically). Returns its SHA-256."""
    rep = reporter or NullReporter()
    sources = apt_sources.sources_for_suite(m.suite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-rootfs-") as tmp_s:
        tmp = Path(tmp_s)
        tree = tmp / "tree"
        rep.stage(f"debian {m.suite}: {len(m.all_packages())} packages (mmdebstrap)")
        hostexec.run(
            mmdebstrap_argv(m, tree),
            what="mmdebstrap",
            timeout=1800,
            stdin=sources.encode(),
            on_line=rep.status,
        )
        rep.finish("root tree ready")
        used = tree_size(tree)
        size_mb = int(used * 1.25 / (1 << 20)) + 64
        rep.stage(f"ext4 image ({size_mb} MiB)")
        img = tmp / "rootfs.ext4"
        with img.open("wb") as f:
            f.truncate(size_mb << 20)
        hostexec.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "mvmroot",
                "-m",
                "0",
                "-O",
                "^has_journal",
                "-d",
                str(tree),
                str(img),
            ],
            what="mkfs.ext4",
            timeout=600,
        )
        shutil.rmtree(tree)
        digest = sha256_file(img)
        os.chmod(img, 0o444)
        img.rename(out)  # atomic: an interrupted build never leaves a usable-looking file
        rep.finish(f"rootfs {used >> 20} MiB")
    if not out.is_file():
        raise ImageBuildError(f"root filesystem missing after build: {out}")
    return digest
