"""Host filesystem helpers that must never reach outside the tree they were given."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def mounts_under(path: Path, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    root = os.path.realpath(path)
    found = []
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        mp = parts[4].encode().decode("unicode_escape")  # \\040 for spaces
        if mp == root or mp.startswith(root + "/"):
            found.append(mp)
    return found


def remove_tree(path: Path) -> bool:
    """``rm -rf`` a leftover build tree, unless something is still mounted inside it
    (a killed chroot build could leave /proc or /dev bind mounts: deleting through
    those would hurt the host). Returns whether it was removed."""
    if not path.exists():
        return True
    busy = mounts_under(path)
    if busy:
        log.warning("not removing %s: still mounted inside: %s", path, ", ".join(busy))
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return not path.exists()
