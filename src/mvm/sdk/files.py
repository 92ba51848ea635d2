"""``sandbox.files``: the guest's filesystem. Paths are absolute guest paths; data read back
comes from the guest and is untrusted."""

from __future__ import annotations

from mvm.api import models as M
from mvm.errors import AgentError, InvalidArgument
from mvm.sdk.backend import Backend
from mvm.sdk.threads import to_thread

#: Largest ``files.write`` (mvmd's request bound) and ``files.read`` (mvmd's answer bound).
MAX_WRITE = M.MAX_FILE_WRITE
MAX_READ = M.MAX_FILE_READ
MAX_PATH = 4096


def check_path(path: str, what: str = "path") -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{what} must be an absolute guest path, not {path!r}")
    if len(path) > MAX_PATH:
        raise InvalidArgument(f"{what} is longer than {MAX_PATH} characters")
    return path


def as_bytes(data: str | bytes, what: str = "data") -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InvalidArgument(f"{what} must be str or bytes, not {type(data).__name__}")


class Files:
    def __init__(self, backend: Backend, key: str) -> None:
        self._be = backend
        self._key = key

    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a whole file (str is UTF-8); missing parent directories are made."""
        body = as_bytes(data)
        if len(body) > MAX_WRITE:
            raise InvalidArgument(
                f"files.write takes at most {MAX_WRITE >> 20} MiB", size=len(body), max=MAX_WRITE
            )
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise InvalidArgument(f"invalid file mode {mode!r}")
        self._be.write(self._key, check_path(path), body, mode)

    def read(self, path: str) -> bytes:
        """The file's bytes (at most ``MAX_READ``)."""
        return self._be.read(self._key, check_path(path))

    def list(self, path: str = "/work") -> list[M.FileEntry]:
        """Entries (name, type, size, mode, mtime) of a directory."""
        return self._be.list_dir(self._key, check_path(path))

    def stat(self, path: str) -> M.FileStat:
        return self._be.stat(self._key, check_path(path))

    def exists(self, path: str) -> bool:
        """True if ``path`` exists (always True in record mode: nothing is known there)."""
        try:
            self.stat(path)
        except AgentError as exc:
            if exc.data.get("code") == "not_found":
                return False
            raise
        return True

    def mkdir(self, path: str, parents: bool = True) -> None:
        self._be.mkdir(self._key, check_path(path), parents)

    def remove(self, path: str, recursive: bool = False) -> None:
        self._be.remove(self._key, check_path(path), recursive)

    def rename(self, src: str, dest: str) -> None:
        self._be.rename(self._key, check_path(src, "src"), check_path(dest, "dest"))


class AsyncFiles:
    """``Files`` for asyncio: each call runs the sync one in a worker thread."""

    def __init__(self, files: Files) -> None:
        self._f = files

    async def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        await to_thread(self._f.write, path, data, mode)

    async def read(self, path: str) -> bytes:
        return await to_thread(self._f.read, path)

    async def list(self, path: str = "/work") -> list[M.FileEntry]:
        return await to_thread(self._f.list, path)

    async def stat(self, path: str) -> M.FileStat:
        return await to_thread(self._f.stat, path)

    async def exists(self, path: str) -> bool:
        return await to_thread(self._f.exists, path)

    async def mkdir(self, path: str, parents: bool = True) -> None:
        await to_thread(self._f.mkdir, path, parents)

    async def remove(self, path: str, recursive: bool = False) -> None:
        await to_thread(self._f.remove, path, recursive)

    async def rename(self, src: str, dest: str) -> None:
        await to_thread(self._f.rename, src, dest)
