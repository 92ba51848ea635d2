"""Record mode: operations are written into the IR instead of performed; no VM starts.

Calls that would return guest data return placeholders that say so (``RecordedBytes``,
``RecordedStr``, exit code 0), so the script keeps going. Bytes the script sends (file
contents, stdin, included files) are stored by SHA-256 under ``files/`` beside ``ir.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from mvm.api import models as M
from mvm.errors import InvalidArgument, SandboxNotFound
from mvm.sdk import images
from mvm.sdk import ir as IRm
from mvm.sdk.backend import Backend, CommandResult, RecordedBytes, SandboxSpec

#: Most bytes a recording may store (file writes, stdin, includes), summed.
MAX_RECORDED_BYTES = 256 * 1024 * 1024


def _version() -> str:
    try:
        return importlib.metadata.version("mvm")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _note(what: str) -> bytes:
    return f"<mvm record mode: {what} is only known in live mode>".encode()


class Recorder(Backend):
    recording = True

    def __init__(self, out_dir: Path, script: str | None = None) -> None:
        self.out_dir = out_dir
        self.ir = IRm.IR(mvm_version=_version(), script=script)
        self._lock = threading.Lock()
        self._refs: dict[str, str] = {}  # sandbox name -> ref
        self._decls: dict[str, IRm.SandboxDecl] = {}
        self._procs = 0
        self._nref = 0
        self._forwards = 0
        self._stored = 0
        self.saved = False

    # -- recording --------------------------------------------------------------------
    def _ref(self, sb: str) -> str:
        ref = self._refs.get(sb)
        if ref is None:
            raise SandboxNotFound(f"no sandbox {sb!r} in this recording", sandbox=sb)
        return ref

    def _op(self, op: str, sb: str | None, **args: Any) -> None:
        with self._lock:
            ref = self._ref(sb) if sb is not None else None
            seq = len(self.ir.operations)
            self.ir.operations.append(IRm.Operation(seq=seq, op=op, sandbox=ref, args=args))

    def _blob(self, data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            dest = self.out_dir / "files" / digest
            if not dest.exists():
                self._stored += len(data)
                if self._stored > MAX_RECORDED_BYTES:
                    raise InvalidArgument(
                        f"the recording holds more than {MAX_RECORDED_BYTES >> 20} MiB of data",
                        max_bytes=MAX_RECORDED_BYTES,
                    )
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{digest}.tmp")
                tmp.write_bytes(data)
                tmp.rename(dest)
        return {"sha256": digest, "size": len(data)}

    def save(self) -> Path:
        """Write ``ir.json`` (atomically) and return its path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "ir.json"
        with self._lock:
            data = IRm.encode(self.ir)
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".ir.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.saved = True
        return path

    def _info(self, sb: str, state: str = "running") -> M.SandboxInfo:
        ref = self._ref(sb)
        d = self._decls.get(ref)  # none for a sandbox the script connects to
        shape = d or M.SandboxShape(image="unknown", cpus=0, memory_mb=0, ttl_seconds=0.0)
        now = time.time()
        return M.info_for(
            shape,
            id=f"recorded-{ref}",
            name=sb,
            state=state,
            created=now,
            expires_at=now + shape.ttl_seconds,
            ttl_left=shape.ttl_seconds,
        )

    # -- sandboxes --------------------------------------------------------------------
    def create(self, spec: SandboxSpec) -> M.SandboxInfo:
        images.check(spec.image)  # the same list live mode would name; nothing boots
        includes = []
        for inc in spec.includes:
            data = inc.source.read_bytes()
            blob = self._blob(data)
            if blob["sha256"] != inc.sha256:
                raise InvalidArgument(f"include: {inc.rel} changed while it was recorded")
            includes.append(
                IRm.IncludeRecord(path=inc.rel, sha256=inc.sha256, size=inc.size, mode=inc.mode)
            )
        with self._lock:
            ref = f"sb{self._nref}"
            self._nref += 1
            name = spec.name or f"recorded-{ref}"
            if name in self._refs:
                raise InvalidArgument(f"the script creates two sandboxes named {name!r}")
            decl = M.extend(
                IRm.SandboxDecl,
                spec,
                ref=ref,
                name=spec.name,
                includes=includes,
                include_root=spec.include_root,
                mounts=list(spec.mounts),
            )
            IRm.check_v1(decl)
            self.ir.sandboxes.append(decl)
            self._decls[ref] = decl
            self._refs[name] = ref
        self._op("sandbox.create", name, ref=ref)
        return self._info(name)

    def connect(self, name: str) -> M.SandboxInfo:
        with self._lock:
            ref = self._refs.get(name)
            if ref is None:
                ref = f"sb{self._nref}"
                self._nref += 1
                self._refs[name] = ref
        self._op("sandbox.connect", name, ref=ref, name=name)
        return self._info(name)

    def list_sandboxes(self) -> list[M.SandboxInfo]:
        self._op("sandbox.list", None)
        return []

    def info(self, sb: str) -> M.SandboxInfo:
        return self._info(sb)

    def set_ttl(self, sb: str, ttl_seconds: float) -> M.SandboxInfo:
        self._op("sandbox.set_ttl", sb, ttl_seconds=ttl_seconds)
        return self._info(sb)

    def pause(self, sb: str) -> M.SandboxInfo:
        self._op("sandbox.pause", sb)
        return self._info(sb, "paused")

    def resume(self, sb: str) -> M.SandboxInfo:
        self._op("sandbox.resume", sb)
        return self._info(sb)

    def snapshot(self, sb: str, name: str) -> M.SnapshotInfo:
        self._op("sandbox.snapshot", sb, name=name)
        info = self._info(sb)
        return M.SnapshotInfo(sandbox=sb, name=name, created=time.time(), size=0, image=info.image)

    def restore(self, sb: str, snapshot: str) -> M.SandboxInfo:
        self._op("sandbox.restore", sb, snapshot=snapshot)
        return self._info(sb)

    def stop(self, sb: str) -> None:
        self._op("sandbox.stop", sb)

    def destroy(self, sb: str) -> None:
        self._op("sandbox.destroy", sb)

    # -- commands ---------------------------------------------------------------------
    def run(self, sb: str, req: M.ExecRequest, check: bool = False) -> CommandResult:
        args: dict[str, Any] = msgspec.to_builtins(req)
        args.pop("stdin", None)
        if not getattr(req, "detach", False):  # not an SDK option: IR v1 stays as it was
            args.pop("detach", None)
        if req.stdin:
            args["stdin"] = self._blob(req.stdin)
        args["check"] = check
        self._op("commands.run", sb, **args)
        return CommandResult(
            exit_code=0,
            stdout_bytes=_note(f"the output of {req.argv!r}"),
            placeholder=True,
        )

    def start(self, sb: str, req: M.ProcStart) -> M.ProcView:
        with self._lock:
            self._procs += 1
            proc = self._procs
        args: dict[str, Any] = msgspec.to_builtins(req)
        args.pop("stdin", None)
        if not getattr(req, "detach", False):  # not an SDK option: IR v1 stays as it was
            args.pop("detach", None)
        if req.stdin:
            args["stdin"] = self._blob(req.stdin)
        self._op("commands.start", sb, proc=proc, **args)
        return M.ProcView(proc=proc, pid=0, argv=req.argv, running=True, started=time.time())

    def proc_wait(self, sb: str, proc: int, timeout: float) -> M.ProcView:
        self._op("proc.wait", sb, proc=proc, timeout=timeout)
        now = time.time()
        return M.ProcView(
            proc=proc, pid=0, argv=[], running=False, started=now, exit_code=0, ended=now
        )

    def proc_signal(self, sb: str, proc: int, signal: int) -> M.ProcView:
        self._op("proc.signal", sb, proc=proc, signal=signal)
        now = time.time()
        return M.ProcView(proc=proc, pid=0, argv=[], running=False, started=now, signal=signal)

    def proc_stdin(self, sb: str, proc: int, data: bytes, eof: bool) -> None:
        self._op("proc.stdin", sb, proc=proc, data=self._blob(data), eof=eof)

    def proc_output(self, sb: str, proc: int, stream: str) -> bytes:
        self._op("proc.output", sb, proc=proc, stream=stream)
        return RecordedBytes(_note(f"the {stream} of process {proc}"))

    # -- files ------------------------------------------------------------------------
    def write(self, sb: str, path: str, data: bytes, mode: int) -> None:
        self._op("files.write", sb, path=path, data=self._blob(data), mode=mode)

    def read(self, sb: str, path: str) -> bytes:
        self._op("files.read", sb, path=path)
        return RecordedBytes(_note(f"the contents of {path}"))

    def list_dir(self, sb: str, path: str) -> list[M.FileEntry]:
        self._op("files.list", sb, path=path)
        return []

    def stat(self, sb: str, path: str) -> M.FileStat:
        self._op("files.stat", sb, path=path)
        return M.FileStat(type="file", size=0, mode=0o644, mtime=time.time())

    def mkdir(self, sb: str, path: str, parents: bool) -> None:
        self._op("files.mkdir", sb, path=path, parents=parents)

    def remove(self, sb: str, path: str, recursive: bool) -> None:
        self._op("files.remove", sb, path=path, recursive=recursive)

    def rename(self, sb: str, src: str, dest: str) -> None:
        self._op("files.rename", sb, src=src, dest=dest)

    # -- logs and ports ---------------------------------------------------------------
    def logs(self, sb: str, follow: bool, since: float | None) -> Iterator[M.LogEvent]:
        self._op("logs", sb, follow=follow, since=since)
        return iter(())

    def forward(self, sb: str, spec: M.PortSpec) -> M.ForwardInfo:
        with self._lock:
            self._forwards += 1
            fid = f"recorded-fwd{self._forwards}"
        self._op("ports.forward", sb, id=fid, **msgspec.to_builtins(spec))
        return M.ForwardInfo(
            id=fid, host=spec.host, host_port=spec.host_port, guest_port=spec.guest_port
        )

    def unforward(self, sb: str, forward_id: str) -> None:
        self._op("ports.close", sb, id=forward_id)


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a recording (ir.json + files/) to ``dest`` (made if missing; files replaced)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "files").mkdir(exist_ok=True)
    for f in sorted((src / "files").glob("*")) if (src / "files").is_dir() else []:
        if IRm.SHA_RE.match(f.name):
            shutil.copyfile(f, dest / "files" / f.name)
    shutil.copyfile(src / "ir.json", dest / "ir.json")
