"""Live mode: every operation is performed by mvmd through ``mvm.client.Client``.

``MVM_SDK_TRACE=FILE`` appends one JSON line per operation with its outcome (exit codes,
output hashes): the IR round-trip test compares a script's trace with its replay's.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from mvm import errors
from mvm.api import models as M
from mvm.client import Client
from mvm.sdk import images
from mvm.sdk.backend import Backend, CommandResult, SandboxSpec

TRACE_ENV = "MVM_SDK_TRACE"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LiveBackend(Backend):
    recording = False

    def __init__(self, client: Client | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._trace_path = os.environ.get(TRACE_ENV)

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client()
            return self._client

    def trace(self, op: str, **fields: Any) -> None:
        if not self._trace_path:
            return
        line = json.dumps({"op": op, **fields}, sort_keys=True)
        with self._lock, open(self._trace_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # -- sandboxes --------------------------------------------------------------------
    def create(self, spec: SandboxSpec) -> M.SandboxInfo:
        """Create, then copy the includes. The included host paths are declared as
        ``uploads``: mvmd decides on them (policy ``mount_roots``) before anything boots."""
        req = M.extend(
            M.CreateSandbox,
            spec,
            name=spec.name,
            uploads=list(spec.mounts),  # mvmd checks them against the policy's mount_roots
        )
        try:
            info = self.client.create(req)
        except errors.ImageNotFound:
            raise images.not_found(spec.image) from None
        try:
            self._copy_includes(info.name, spec)
        except BaseException:
            try:
                self.client.down(info.name)
            except errors.MvmError:
                pass
            raise
        self.trace("sandbox.create", image=spec.image, includes=len(spec.includes))
        return info

    def _copy_includes(self, name: str, spec: SandboxSpec) -> None:
        made: set[str] = set()
        for inc in spec.includes:
            data = inc.source.read_bytes()
            if len(data) != inc.size or _sha(data) != inc.sha256:
                raise errors.InvalidArgument(
                    f"include: {inc.rel} changed while it was being copied (or does not "
                    "match its recorded sha256)",
                    path=inc.rel,
                )
            parent = inc.guest_path.rsplit("/", 1)[0]
            if parent not in made:
                self.client.mkdir(name, parent, parents=True)
                made.add(parent)
            self.client.write_file(name, inc.guest_path, data, mode=inc.mode)

    def connect(self, name: str) -> M.SandboxInfo:
        return self.client.get(name)

    def list_sandboxes(self) -> list[M.SandboxInfo]:
        return self.client.list_sandboxes()

    def info(self, sb: str) -> M.SandboxInfo:
        return self.client.get(sb)

    def set_ttl(self, sb: str, ttl_seconds: float) -> M.SandboxInfo:
        return self.client.set_ttl(sb, ttl_seconds)

    def pause(self, sb: str) -> M.SandboxInfo:
        info = self.client.pause(sb)
        self.trace("sandbox.pause", state=info.state)
        return info

    def resume(self, sb: str) -> M.SandboxInfo:
        info = self.client.resume(sb)
        self.trace("sandbox.resume", state=info.state)
        return info

    def snapshot(self, sb: str, name: str) -> M.SnapshotInfo:
        snap = self.client.snapshot_save(sb, name)
        self.trace("sandbox.snapshot", name=name)
        return snap

    def fork(self, sb: str, name: str, count: int) -> list[M.SandboxInfo]:
        out = self.client.fork(sb, name, count)
        self.trace("sandbox.fork", count=count, pause_seconds=out.pause_seconds)
        return out.children

    def restore(self, sb: str, snapshot: str) -> M.SandboxInfo:
        info = self.client.snapshot_restore(sb, snapshot)
        if info.state == "paused":
            info = self.client.resume(sb)
        self.trace("sandbox.restore", snapshot=snapshot, state=info.state)
        return info

    def stop(self, sb: str) -> None:
        self.client.down(sb)
        self.trace("sandbox.stop")

    def destroy(self, sb: str) -> None:
        try:
            self.client.down(sb)
        except errors.SandboxNotFound:
            pass
        try:
            snaps = self.client.snapshot_list(sb)
        except errors.SandboxNotFound:
            snaps = []  # serve answers for a name only while a VM or snapshot of it is left
        for snap in snaps:
            self.client.snapshot_remove(sb, snap.name)
        self.trace("sandbox.destroy")

    # -- commands ---------------------------------------------------------------------
    def run(self, sb: str, req: M.ExecRequest, check: bool = False) -> CommandResult:
        end = M.gather_exec(self.client.exec_stream(sb, req))
        res = CommandResult(
            exit_code=end.exit_code,
            stdout_bytes=end.stdout,
            stderr_bytes=end.stderr,
            audit_id=end.audit_id,
            truncated=end.truncated_stdout or end.truncated_stderr,
            timed_out=end.timed_out,
            signal=end.signal,
            duration=end.duration,
        )
        self.trace(
            "commands.run",
            argv=req.argv,
            exit_code=res.exit_code,
            stdout=_sha(res.stdout_bytes),
            stderr=_sha(res.stderr_bytes),
            timed_out=res.timed_out,
        )
        return res

    def start(self, sb: str, req: M.ProcStart) -> M.ProcView:
        view = self.client.proc_start(sb, req)
        self.trace("commands.start", argv=req.argv)
        return view

    def proc_wait(self, sb: str, proc: int, timeout: float) -> M.ProcView:
        return self.client.proc_wait(sb, proc, timeout)

    def proc_signal(self, sb: str, proc: int, signal: int) -> M.ProcView:
        return self.client.proc_signal(sb, proc, signal)

    def proc_stdin(self, sb: str, proc: int, data: bytes, eof: bool) -> None:
        self.client.proc_stdin(sb, proc, data, eof=eof)

    def proc_output(self, sb: str, proc: int, stream: str) -> bytes:
        return self.client.proc_output(sb, proc, stream)

    # -- files ------------------------------------------------------------------------
    def write(self, sb: str, path: str, data: bytes, mode: int) -> None:
        try:
            self.client.write_file(sb, path, data, mode=mode)
        except errors.AgentError as exc:
            parent = path.rsplit("/", 1)[0]
            if exc.data.get("code") != "not_found" or not parent:
                raise
            self.client.mkdir(sb, parent, parents=True)
            self.client.write_file(sb, path, data, mode=mode)
        self.trace("files.write", path=path, sha256=_sha(data))

    def read(self, sb: str, path: str) -> bytes:
        data = self.client.read_file(sb, path)
        self.trace("files.read", path=path, sha256=_sha(data))
        return data

    def list_dir(self, sb: str, path: str) -> list[M.FileEntry]:
        entries = self.client.list_dir(sb, path)
        self.trace("files.list", path=path, names=sorted(e.name for e in entries))
        return entries

    def stat(self, sb: str, path: str) -> M.FileStat:
        return self.client.stat(sb, path)

    def mkdir(self, sb: str, path: str, parents: bool) -> None:
        self.client.mkdir(sb, path, parents=parents)

    def remove(self, sb: str, path: str, recursive: bool) -> None:
        self.client.remove(sb, path, recursive=recursive)
        self.trace("files.remove", path=path)

    def rename(self, sb: str, src: str, dest: str) -> None:
        self.client.move(sb, src, dest)
        self.trace("files.rename", src=src, dest=dest)

    # -- logs and ports ---------------------------------------------------------------
    def logs(self, sb: str, follow: bool, since: float | None) -> Iterator[M.LogEvent]:
        return self.client.logs(sb, follow=follow, since=since)

    def forward(self, sb: str, spec: M.PortSpec) -> M.ForwardInfo:
        fwd = self.client.forward(sb, spec)
        self.trace("ports.forward", guest_port=spec.guest_port)
        return fwd

    def unforward(self, sb: str, forward_id: str) -> None:
        self.client.unforward(sb, forward_id)
