"""The seam between the SDK's API and what performs it: mvmd (live) or a recorder.

Every method is one IR operation (its name in ``OP``), so recording, replaying and
performing share one vocabulary. ``sb`` is the sandbox's name (live) or IR ref (record).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass

from mvm.api import models as M
from mvm.sdk.include import IncludeFile


class RecordedBytes(bytes):
    """Bytes a recording returns where live mode would return guest data."""

    placeholder = True


class RecordedStr(str):
    """Text a recording returns where live mode would return guest output."""

    placeholder = True

    __slots__ = ()


def is_placeholder(value: object) -> bool:
    """True for a value that record/plan mode made up instead of reading the guest."""
    return bool(getattr(value, "placeholder", False))


class SandboxSpec(M.SandboxShape, kw_only=True):
    """Everything ``Sandbox.create`` asks for, validated: the one sandbox shape
    (``api.models.SandboxShape``) plus the name and the files to copy in."""

    name: str | None = None
    includes: tuple[IncludeFile, ...] = ()
    #: Host directories the includes come from (admission checks them).
    mounts: tuple[str, ...] = ()
    include_root: str | None = None


@dataclass(frozen=True)
class CommandResult:
    """The outcome of ``commands.run`` (or ``handle.wait``). Output is decoded as UTF-8
    (bad bytes replaced); the raw bytes are in ``stdout_bytes``/``stderr_bytes``. Treat it
    as untrusted: it comes from the guest."""

    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    audit_id: str | None = None
    truncated: bool = False
    timed_out: bool = False
    signal: int | None = None
    duration: float = 0.0
    placeholder: bool = False

    @property
    def stdout(self) -> str:
        if self.placeholder:
            return RecordedStr(self.stdout_bytes.decode())
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        if self.placeholder:
            return RecordedStr(self.stderr_bytes.decode())
        return self.stderr_bytes.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class Backend(abc.ABC):
    """What the SDK needs done. ``recording`` tells the API whether results are real."""

    recording: bool = False

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> M.SandboxInfo: ...
    @abc.abstractmethod
    def connect(self, name: str) -> M.SandboxInfo: ...
    @abc.abstractmethod
    def list_sandboxes(self) -> list[M.SandboxInfo]: ...
    @abc.abstractmethod
    def info(self, sb: str) -> M.SandboxInfo: ...
    @abc.abstractmethod
    def set_ttl(self, sb: str, ttl_seconds: float) -> M.SandboxInfo: ...
    @abc.abstractmethod
    def pause(self, sb: str) -> M.SandboxInfo: ...
    @abc.abstractmethod
    def resume(self, sb: str) -> M.SandboxInfo: ...
    @abc.abstractmethod
    def snapshot(self, sb: str, name: str) -> M.SnapshotInfo: ...
    @abc.abstractmethod
    def restore(self, sb: str, snapshot: str) -> M.SandboxInfo: ...
    def fork(self, sb: str, name: str, count: int) -> list[M.SandboxInfo]:
        """Children of a running sandbox (only a live backend has VMs to fork)."""
        from mvm.errors import InvalidArgument

        raise InvalidArgument("fork needs a live sandbox (not available in record mode)")

    @abc.abstractmethod
    def stop(self, sb: str) -> None: ...
    @abc.abstractmethod
    def destroy(self, sb: str) -> None: ...

    @abc.abstractmethod
    def run(self, sb: str, req: M.ExecRequest, check: bool) -> CommandResult: ...
    @abc.abstractmethod
    def start(self, sb: str, req: M.ProcStart) -> M.ProcView: ...
    @abc.abstractmethod
    def proc_wait(self, sb: str, proc: int, timeout: float) -> M.ProcView: ...
    @abc.abstractmethod
    def proc_signal(self, sb: str, proc: int, signal: int) -> M.ProcView: ...
    @abc.abstractmethod
    def proc_stdin(self, sb: str, proc: int, data: bytes, eof: bool) -> None: ...
    @abc.abstractmethod
    def proc_output(self, sb: str, proc: int, stream: str) -> bytes: ...

    @abc.abstractmethod
    def write(self, sb: str, path: str, data: bytes, mode: int) -> None: ...
    @abc.abstractmethod
    def read(self, sb: str, path: str) -> bytes: ...
    @abc.abstractmethod
    def list_dir(self, sb: str, path: str) -> list[M.FileEntry]: ...
    @abc.abstractmethod
    def stat(self, sb: str, path: str) -> M.FileStat: ...
    @abc.abstractmethod
    def mkdir(self, sb: str, path: str, parents: bool) -> None: ...
    @abc.abstractmethod
    def remove(self, sb: str, path: str, recursive: bool) -> None: ...
    @abc.abstractmethod
    def rename(self, sb: str, src: str, dest: str) -> None: ...

    @abc.abstractmethod
    def logs(self, sb: str, follow: bool, since: float | None) -> Iterator[M.LogEvent]: ...
    @abc.abstractmethod
    def forward(self, sb: str, spec: M.PortSpec) -> M.ForwardInfo: ...
    @abc.abstractmethod
    def unforward(self, sb: str, forward_id: str) -> None: ...
