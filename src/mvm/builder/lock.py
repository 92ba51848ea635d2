"""``mvm.lock``: the exact inputs of a build, next to its manifest or Dockerfile.

A lock records the input hashes (manifest, Dockerfile, context, archive), every Debian
package as ``name=version``, and the resulting rootfs hash and image id. ``build
--locked`` installs exactly those versions and never changes the lock: inputs that differ
from it are refused before the builder boots (``check_inputs``), a build whose packages or
rootfs come out different is refused before the image is registered (``check_result``),
and when the mirror no longer serves a pinned version apt in the builder fails and the
error says which lock it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec

from mvm.errors import ManifestError

LOCK_NAME = "mvm.lock"
VERSION = 1
_PIN = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9]+)?=[A-Za-z0-9.+~:-]+$")


class Lock(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    image: str
    inputs: dict[str, str]
    packages: list[str]
    rootfs_sha256: str
    image_id: str

    def pins(self) -> list[str]:
        return list(self.packages)


def dumps(lock: Lock) -> str:
    """Stable text: sorted keys, one package per line, so diffs of a lock read well."""
    doc: dict[str, Any] = msgspec.to_builtins(lock)
    doc["packages"] = sorted(doc["packages"])
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def loads(text: str, origin: str) -> Lock:
    try:
        lock = msgspec.json.decode(text.encode(), type=Lock)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ManifestError(f"{origin}: not a valid lock file: {exc}") from None
    if lock.version != VERSION:
        raise ManifestError(f"{origin}: lock version {lock.version} is not {VERSION}")
    bad = [p for p in lock.packages if not _PIN.match(p)]
    if bad:
        raise ManifestError(f"{origin}: bad package pins: {', '.join(bad[:5])}")
    return lock


def read(directory: Path) -> Lock:
    f = directory / LOCK_NAME
    if not f.is_file():
        raise ManifestError(
            f"--locked: no {LOCK_NAME} in {directory}",
            hint="build once without --locked to write it",
        )
    return loads(f.read_text(), str(f))


def write(directory: Path, lock: Lock) -> Path:
    f = directory / LOCK_NAME
    tmp = directory / f".{LOCK_NAME}.tmp"
    tmp.write_text(dumps(lock))
    tmp.replace(f)
    return f


def _refuse(what: str) -> ManifestError:
    return ManifestError(
        f"--locked: {what}; the build would change {LOCK_NAME}",
        hint=f"build without --locked to re-resolve and rewrite {LOCK_NAME}",
    )


def check_inputs(lock: Lock, inputs: dict[str, str], wanted: list[str]) -> None:
    """Refuse, before anything boots, a locked build whose inputs are not the lock's:
    ``inputs`` are the input hashes, ``wanted`` the package names the build asks for."""
    changed = sorted(
        k for k in set(inputs) | set(lock.inputs) if inputs.get(k) != lock.inputs.get(k)
    )
    if changed:
        raise _refuse(f"the inputs differ from the lock's ({', '.join(changed)})")
    pinned = {p.split("=", 1)[0].split(":", 1)[0] for p in lock.packages}
    missing = sorted(set(wanted) - pinned)
    if missing:
        raise _refuse(f"packages not in the lock: {', '.join(missing[:10])}")


def check_result(lock: Lock, packages: list[str], rootfs_sha256: str) -> None:
    """Refuse a locked build that came out different from the lock (before registering)."""
    got, want = set(packages), set(lock.packages)
    if got != want:
        diff = sorted(got ^ want)
        raise _refuse(f"the installed packages differ ({', '.join(diff[:10])})")
    if rootfs_sha256 != lock.rootfs_sha256:
        raise _refuse(
            f"the root filesystem came out as {rootfs_sha256[:12]}, "
            f"not the locked {lock.rootfs_sha256[:12]}"
        )
