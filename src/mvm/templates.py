"""Boot templates: a VM booted once to "agent ready" and snapshotted, so others start by restore.

A template is a RAM file (the guest's memory, written while the template VM ran
with ``share=on``) plus its device state (a few tens of KiB, saved with the
``x-ignore-shared`` migration capability). A clone maps the RAM file privately
(``share=off``: copy-on-write, pages shared between clones by the page cache) and
loads the device state: it answers its first request in about half a second
instead of a multi-second cold boot. The RAM file is never written after the
template is made, which is what keeps clones sound.

Templates are keyed by everything that must match between template and clone:
image, initramfs (agent), CPUs, memory, overlay size, accelerator, the QEMU
binary, and whether the VM has a NIC. They are made on first use of a shape, under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from mvm import paths
from mvm.errors import VMError

#: Bumped when the template recipe (argv shape, agent handshake) changes.
TEMPLATE_VERSION = 2
#: Longest wait for another process or task making the same template (two cold boots' worth).
LOCK_TIMEOUT = 600.0
LOCK_POLL = 0.05


@dataclass(frozen=True)
class Template:
    root: Path

    @property
    def ram(self) -> Path:
        return self.root / "ram"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def meta(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.root / "template.json").read_text())
        return data


def enabled() -> bool:
    """Templates are on unless ``MVM_TEMPLATES=0``."""
    return os.environ.get("MVM_TEMPLATES", "1").strip().lower() not in ("0", "false", "no", "off")


def qemu_identity(qemu_path: str) -> str:
    st = os.stat(qemu_path)
    return f"{qemu_path}:{st.st_size}:{int(st.st_mtime)}"


def template_key(
    *,
    image_id: str,
    initramfs: str,
    cpus: int,
    memory_mb: int,
    overlay_size: str,
    accel: str,
    qemu: str,
    network: bool = False,
    warm: str | None = None,
) -> str:
    doc: dict[str, object] = {
        "v": TEMPLATE_VERSION,
        "image": image_id,
        "initramfs": initramfs,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "overlay": overlay_size,
        "accel": accel,
        "qemu": qemu,
    }
    if network:  # a NIC is part of the device state (absent: keys stay as they were)
        doc["net"] = True
    if warm is not None:  # the image's warm recipe (mvm.warm): its hash
        doc["warm"] = warm
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


class TemplateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.home() / "templates"

    def get(self, key: str) -> Template | None:
        t = Template(self.root / key)
        if (t.root / "template.json").is_file() and t.ram.is_file() and t.state.is_file():
            return t
        return None

    @contextlib.asynccontextmanager
    async def lock(self, key: str, timeout: float = LOCK_TIMEOUT) -> AsyncIterator[None]:
        """Serialise creation of one template (others wait, then find it made).

        An flock, so it holds across processes (CLI runs and mvmd); taken by polling
        with LOCK_NB so that waiting never blocks the event loop, on which the holder
        may itself be awaiting its template's boot (mvmd serves all creates on one loop).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f".{key}.lock").open("w") as f:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise VMError(
                            f"boot template {key[:12]} stayed locked for {timeout:.0f}s",
                            hint="another mvm process is making it; retry when it is done",
                        ) from None
                    await asyncio.sleep(LOCK_POLL)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))

    def commit(self, staging: Path, key: str, meta: dict[str, object]) -> Template:
        """Move a finished template into place (atomic rename)."""
        (staging / "template.json").write_text(json.dumps(meta))
        for f in ("ram", "state"):
            os.chmod(staging / f, 0o444)
        dest = self.root / key
        self._set_aside(dest)
        staging.rename(dest)
        return Template(dest)

    def _set_aside(self, path: Path) -> None:
        """Rename first, delete after: clones mapping its RAM file keep working, and
        nobody sees a half-deleted template."""
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=self.root, prefix=".old-"))
            path.rename(aside / "t")
            shutil.rmtree(aside, ignore_errors=True)

    async def discard_if_same(self, key: str, seen: Template) -> None:
        """Drop template ``key`` if it is still the one that failed (not a newer one)."""
        async with self.lock(key):
            try:
                same = (self.root / key / "state").stat().st_ino == seen.state.stat().st_ino
            except OSError:
                return
            if same:
                self._set_aside(self.root / key)

    async def discard(self, key: str) -> None:
        async with self.lock(key):
            self._set_aside(self.root / key)

    def all(self) -> list[Template]:
        if not self.root.is_dir():
            return []
        return [t for p in sorted(self.root.iterdir()) if (t := self.get(p.name)) is not None]

    def prune(self) -> int:
        """Remove every template (they are re-made on demand). Returns how many."""
        n = 0
        for p in self.root.iterdir() if self.root.is_dir() else []:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n
