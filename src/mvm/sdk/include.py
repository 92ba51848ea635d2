"""``include=[...]``: which host files enter the guest, checked before anything is sent.

Paths are relative to the script's directory and land in the guest under
``/work/<relative path>``. Nothing else from the host enters. Bounded in file count and
bytes; absolute paths, ``..`` and symlinks that leave the tree are refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mvm.errors import InvalidArgument

#: Where included paths land in the guest.
GUEST_ROOT = "/work"
#: Most files and bytes ``include=`` may bring into one sandbox.
MAX_FILES = 1000
MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class IncludeFile:
    """One file to copy: ``rel`` (POSIX, relative) under /work, its content hash, size, mode
    and the host file to read it from."""

    rel: str
    sha256: str
    size: int
    mode: int
    source: Path

    @property
    def guest_path(self) -> str:
        return f"{GUEST_ROOT}/{self.rel}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_entry(entry: str) -> PurePosixPath:
    """The relative path ``entry`` names, or InvalidArgument (absolute, ``..``, empty)."""
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise InvalidArgument(f"include entry {entry!r} is not a path")
    p = PurePosixPath(entry)
    if p.is_absolute():
        raise InvalidArgument(
            f"include entry {entry!r} is absolute",
            hint="include paths are relative to the script's directory",
            entry=entry,
        )
    if ".." in p.parts:
        raise InvalidArgument(f"include entry {entry!r} contains '..'", entry=entry)
    return p


def collect(base: Path, entries: list[str] | tuple[str, ...]) -> list[IncludeFile]:
    """Every file under ``entries`` (relative to ``base``), sorted, within the bounds."""
    if isinstance(entries, str):
        raise InvalidArgument("include= takes a list of paths, not a string")
    root = base.resolve()
    found: dict[str, IncludeFile] = {}
    total = 0

    def add(path: Path) -> None:
        nonlocal total
        rel = path.relative_to(root).as_posix()
        if rel in found:
            return
        st = _checked_stat(root, path)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"include: {rel} is not a regular file", path=rel)
        total += st.st_size
        if len(found) + 1 > MAX_FILES or total > MAX_BYTES:
            raise InvalidArgument(
                f"include= brings more than {MAX_FILES} files or {MAX_BYTES >> 20} MiB",
                hint="include less, or copy large data with files.write in pieces",
                max_files=MAX_FILES,
                max_bytes=MAX_BYTES,
            )
        mode = 0o755 if st.st_mode & 0o111 else 0o644
        found[rel] = IncludeFile(rel, file_sha256(path), st.st_size, mode, path)

    for entry in entries:
        p = root / check_entry(entry)
        _checked_stat(root, p)
        if p.is_dir() and not p.is_symlink():
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames.sort()
                for d in dirnames:
                    if (Path(dirpath) / d).is_symlink():
                        raise InvalidArgument(
                            f"include: {Path(dirpath, d).relative_to(root)} is a directory "
                            "symlink (not followed)"
                        )
                for name in sorted(filenames):
                    add(Path(dirpath) / name)
        else:
            add(p)
    return [found[k] for k in sorted(found)]


def _checked_stat(root: Path, path: Path) -> os.stat_result:
    """stat of ``path`` (following a symlink only if it stays inside ``root``)."""
    try:
        lst = path.lstat()
    except FileNotFoundError:
        raise InvalidArgument(
            f"include: {path} does not exist",
            hint=f"include paths are relative to the script's directory ({root})",
            path=str(path),
        ) from None
    if stat.S_ISLNK(lst.st_mode):
        target = path.resolve()
        if target != root and root not in target.parents:
            raise InvalidArgument(
                f"include: {path.relative_to(root)} is a symlink leaving {root}",
                path=str(path),
            )
        return target.stat()
    return lst
