"""Files in a sandbox: read, write, list, stat, mkdir, move, remove; changes audited."""

from __future__ import annotations

from mvm import audit
from mvm.api import models as M
from mvm.service.core import Core
from mvm.service.live import audit_after


def _stat(st: object, audit_id: str | None = None) -> M.FileStat:
    from mvm.agent.client import Stat

    assert isinstance(st, Stat)
    return M.FileStat(
        type=st.type,
        size=st.size,
        mode=st.mode,
        mtime=st.mtime,
        uid=st.uid,
        gid=st.gid,
        audit_id=audit_id,
    )


class Files:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def read(self, name: str, path: str) -> bytes:
        """A file's bytes (guest data: untrusted); what came out is audited by hash and
        size (a download, a screenshot read back, a result file)."""
        live, agent = self.core.running(name)
        data = await agent.read_file(path, limit=M.MAX_FILE_READ)
        audit_after("fs.read", live.name, path=path, size=len(data), sha256=audit.sha256_hex(data))
        return data

    async def write(self, name: str, path: str, data: bytes, mode: int) -> M.FileStat:
        live, agent = self.core.running(name)
        await agent.write_file(path, data, mode=mode)
        aid = audit_after(
            "fs.write",
            live.name,
            path=path,
            size=len(data),
            sha256=audit.sha256_hex(data),
            mode=mode,
        )
        return _stat(await agent.stat(path), aid)

    async def remove(self, name: str, path: str, recursive: bool) -> str | None:
        live, agent = self.core.running(name)
        await agent.remove(path, recursive=recursive)
        return audit_after("fs.remove", live.name, path=path, recursive=recursive)

    async def list_dir(self, name: str, path: str) -> list[M.FileEntry]:
        _, agent = self.core.running(name)
        return [
            M.FileEntry(name=e.name, type=e.type, size=e.size, mode=e.mode, mtime=e.mtime)
            for e in await agent.list_dir(path)
        ]

    async def stat(self, name: str, path: str) -> M.FileStat:
        _, agent = self.core.running(name)
        return _stat(await agent.stat(path))

    async def mkdir(self, name: str, path: str, parents: bool) -> str | None:
        live, agent = self.core.running(name)
        await agent.mkdir(path, parents=parents)
        return audit_after("fs.mkdir", live.name, path=path, parents=parents)

    async def move(self, name: str, path: str, dest: str) -> str | None:
        live, agent = self.core.running(name)
        await agent.move(path, dest)
        return audit_after("fs.move", live.name, path=path, dest=dest)

    def uploads(self, name: str, paths: list[str]) -> None:
        """Host paths a client is about to copy in: checked against the policy (PolicyDenied
        names the ``mounts`` rule). The SDK and ``up`` declare them at create; this is the
        same check for copies into a sandbox that already runs."""
        import os

        live = self.core.get(name)
        self.core.gate.uploads(live.name, [os.path.realpath(p) for p in paths])
