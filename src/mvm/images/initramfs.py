"""The initramfs: busybox, the virtio modules, ``/init``, and the guest agent.

Written as a deterministic, uncompressed newc cpio archive by a pure function
(no root, no ``cpio`` binary), so equal inputs give byte-equal archives and the
file can be cached under its SHA-256. It is uncompressed on purpose: under TCG
decompressing is slower than copying a few MiB.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mvm import hostexec
from mvm.images.kernel import Kernel

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
#: The run_code programs (docs/code.md), shipped beside the agent.
CODE_FILES = ("code_server.py", "code_output.py", "code_bash.py", "code_node.py")


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without leading "/"
    mode: int  # full st_mode (type and permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def newc(entries: Iterable[Entry]) -> bytes:
    """Serialise entries as a newc cpio archive (what the kernel unpacks)."""
    out = bytearray()
    ino = 1
    for e in [*entries, Entry("TRAILER!!!", 0)]:
        name = e.path.encode() + b"\0"
        fields = (
            ino,
            e.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(e.mode) else 1,
            0,  # mtime: fixed for reproducible archives
            len(e.data),
            0,
            0,
            e.rdev[0],
            e.rdev[1],
            len(name),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad(len(header) + len(name))
        out += e.data + _pad(len(e.data))
        ino += 1
    return bytes(out)


#: The agent's modules (``init.sh`` copies every ``/mvm/*.py`` beside ``agent.py``, whose
#: folder the agent puts first on its ``sys.path``).
GUEST_MODULES = (
    "agent.py",
    "base.py",
    "cgroups.py",
    "execs.py",
    "files.py",
    "procs.py",
    "relay.py",
    "spawning.py",
    "system.py",
)


def agent_sources() -> dict[str, bytes]:
    """The guest agent files, as shipped in this package."""
    guest = resources.files("mvm.agent.guest")
    protocol = resources.files("mvm.agent").joinpath("protocol.py").read_bytes()
    files = {name: guest.joinpath(name).read_bytes() for name in GUEST_MODULES}
    return {**files, "protocol.py": protocol}


def code_sources() -> dict[str, bytes]:
    """The run_code server and client (docs/code.md): readable by the guest user, unlike
    the agent's own files, since contexts run as that user."""
    pkg = resources.files("mvm.agent.guest")
    return {n: pkg.joinpath(n).read_bytes() for n in CODE_FILES}


def init_script() -> bytes:
    return resources.files("mvm.images").joinpath("init.sh").read_bytes()


def find_busybox() -> Path:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file():
            return p
    return Path(hostexec.which("busybox"))


def entries_for(kernel: Kernel, busybox: bytes) -> list[Entry]:
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    es = [
        Entry("bin", d),
        Entry("dev", d),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("lib", d),
        Entry("lib/modules", d),
        Entry("mvm", d),
        Entry("mvm/code", d),
        Entry("init", x, init_script()),
        Entry("bin/busybox", x, busybox),
    ]
    mods = kernel.modules_dir
    for name in kernel.module_order():
        es.append(Entry(f"lib/modules/{name}.ko", f, (mods / f"{name}.ko").read_bytes()))
    es.append(Entry("lib/modules/order", f, (mods / "order").read_bytes()))
    for name, data in sorted(agent_sources().items()):
        es.append(Entry(f"mvm/{name}", f, data))
    for name, data in sorted(code_sources().items()):
        es.append(Entry(f"mvm/code/{name}", f, data))
    return es


def ensure_initramfs(kernel: Kernel, cache: Path) -> tuple[Path, str]:
    """Build (or reuse) the initramfs for this kernel and this package's agent."""
    archive = newc(entries_for(kernel, find_busybox().read_bytes()))
    digest = hashlib.sha256(archive).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{digest}.cpio"
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(archive)
        os.replace(tmp, path)  # atomic; concurrent writers write the same bytes
    return path, digest
