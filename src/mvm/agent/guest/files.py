"""Files (fs.*): read and write by offset, list, stat, mkdir, remove and move, with OS
errors answered as the protocol's codes and a listing kept within one frame.

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent import protocol as P
    from mvm.agent.guest.base import (
        RequestError,
        os_error,
        want_bool,
        want_int,
        want_path,
        want_str,
    )
    from mvm.agent.guest.spawning import DEFAULT_USER
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    import protocol as P
    from base import RequestError, os_error, want_bool, want_int, want_path, want_str
    from spawning import DEFAULT_USER

MAX_LIST_ENTRIES = 10000


def owner_ids(h: dict[str, Any]) -> tuple[int, int] | None:
    name = want_str(h, "owner", DEFAULT_USER)
    if name == "root":
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def stat_dict(st: os.stat_result) -> dict[str, Any]:
    return {
        "type": kind_of(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


class FileHandlers:
    """The fs requests: no state of their own, every path absolute and checked."""

    def fs_read(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        offset = want_int(h, "offset", 0, 0, 1 << 62)
        length = want_int(h, "length", P.CHUNK, 0, P.MAX_PAYLOAD)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise RequestError(P.E_IS_DIR, f"{path}: is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise RequestError(P.E_BAD_REQUEST, f"{path}: not a regular file")
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise os_error(exc, path) from None
        finally:
            os.close(fd)
        return {"size": st.st_size, "eof": offset + len(data) >= st.st_size}, data

    def fs_write(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        offset = want_int(h, "offset", 0, 0, 1 << 62)
        truncate = want_bool(h, "truncate", offset == 0)
        mode = want_int(h, "mode", 0o644, 0, 0o7777)
        parents = want_bool(h, "parents", True)
        ids = owner_ids(h)
        try:
            if parents:
                self._makedirs(os.path.dirname(path), ids)
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode)
            try:
                if not existed and ids is not None:
                    os.fchown(fd, *ids)
                view = memoryview(payload)
                pos = offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view = view[n:]
                    pos += n
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {"size": size}, b""

    @staticmethod
    def _makedirs(path: str, ids: tuple[int, int] | None) -> None:
        missing = []
        p = path
        while p and p != "/" and not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                continue
            if ids is not None:
                os.chown(d, *ids)

    def fs_list(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        entries: list[dict[str, Any]] = []
        truncated = False
        try:
            with os.scandir(path) as it:
                for e in it:
                    if len(entries) >= MAX_LIST_ENTRIES:
                        truncated = True
                        break
                    try:
                        d = stat_dict(e.stat(follow_symlinks=False))
                    except OSError:
                        continue
                    d["name"] = e.name
                    entries.append(d)
        except OSError as exc:
            raise os_error(exc, path) from None
        entries.sort(key=lambda d: d["name"])
        # Keep the reply inside one frame: trim (and say so) if names are huge.
        while entries and len(json.dumps(entries, separators=(",", ":"))) > P.MAX_HEADER - 1024:
            entries = entries[: len(entries) // 2]
            truncated = True
        return {"entries": entries, "truncated": truncated}, b""

    def fs_stat(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            raise os_error(exc, path) from None
        return stat_dict(st), b""

    def fs_mkdir(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        parents = want_bool(h, "parents", False)
        ids = owner_ids(h)
        try:
            if parents:
                self._makedirs(path, ids)
            else:
                os.mkdir(path, 0o755)
                if ids is not None:
                    os.chown(path, *ids)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}, b""

    def fs_remove(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        recursive = want_bool(h, "recursive", False)
        if os.path.realpath(path) == "/":  # normpath keeps "//", realpath does not
            raise RequestError(P.E_PERMISSION, "refusing to remove /")
        try:
            st = os.stat(path, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}, b""

    def fs_move(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        src = want_path(h, "path")
        dst = want_path(h, "dest")
        try:
            os.rename(src, dst)
        except OSError as exc:
            raise os_error(exc, src) from None
        return {}, b""
