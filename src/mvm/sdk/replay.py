"""Replay an IR (``mvmctl run --mode live DIR``): perform its operations in order, without
the script. Command output goes to stdout/stderr as it would from the script's commands.

The IR directory is input, so everything in it is checked: the document against its
format, each blob against its SHA-256 and size, each operation's arguments against their
types. A failure stops the replay and stops the sandboxes it created (as the script's
``with`` block would have).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgspec

from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError, SandboxNotFound
from mvm.sdk import ir as IRm
from mvm.sdk.backend import Backend, SandboxSpec
from mvm.sdk.commands import finish
from mvm.sdk.files import MAX_WRITE
from mvm.sdk.include import IncludeFile
from mvm.sdk.live import LiveBackend

T = TypeVar("T")


def convert(obj: Any, typ: type[T], what: str) -> T:
    """``msgspec.convert`` with InvalidArgument for input that does not fit."""
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"IR {what}: {exc}") from None


class Replayer:
    def __init__(self, directory: Path, backend: Backend, out: BinaryIO, err: BinaryIO) -> None:
        self.dir = directory
        self.be = backend
        self.out, self.err = out, err
        self.names: dict[str, str] = {}  # ref -> live sandbox name
        self.procs: dict[tuple[str, int], int] = {}
        self.forwards: dict[str, str] = {}
        self.open: list[str] = []  # sandboxes made here and not yet stopped

    # -- checked access to untrusted input ------------------------------------------------
    def blob(self, ref: Any) -> bytes:
        b = convert(ref, IRm.Blob, "blob")
        if not 0 <= b.size <= MAX_WRITE:
            raise InvalidArgument(f"IR blob {b.sha256[:12]} is too large ({b.size} bytes)")
        path = IRm.blob_path(self.dir, b.sha256)
        try:
            with path.open("rb") as f:
                data = f.read(b.size + 1)
        except FileNotFoundError:
            raise InvalidArgument(f"the IR's file {path} is missing") from None
        if len(data) != b.size or hashlib.sha256(data).hexdigest() != b.sha256:
            raise InvalidArgument(f"the IR's file {path} does not match its sha256")
        return data

    @staticmethod
    def arg(a: dict[str, Any], key: str, typ: type[Any]) -> Any:
        v = a.get(key)
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise InvalidArgument(f"IR argument {key!r} must be {typ.__name__}, not {v!r}")
        return v

    def sandbox_spec(self, decl: IRm.SandboxDecl) -> SandboxSpec:
        files = []
        for inc in decl.includes:
            IRm.check_include_path(inc.path)
            files.append(
                IncludeFile(
                    inc.path, inc.sha256, inc.size, inc.mode, IRm.blob_path(self.dir, inc.sha256)
                )
            )
        return M.extend(SandboxSpec, decl, name=decl.name, includes=tuple(files))

    # -- the loop -------------------------------------------------------------------------
    def run(self, ir: IRm.IR) -> None:
        decls = {d.ref: d for d in ir.sandboxes}
        try:
            for op in ir.operations:
                self.step(op, decls)
        except BaseException:
            for name in reversed(self.open):
                try:
                    self.be.stop(name)
                except MvmError:
                    pass
            raise

    def step(self, op: IRm.Operation, decls: dict[str, IRm.SandboxDecl]) -> None:
        a, be, kind = op.args, self.be, op.op
        ref = op.sandbox
        if kind == "sandbox.create":
            decl = decls.get(str(a.get("ref")))
            if decl is None:
                raise InvalidArgument(f"operation {op.seq} creates an undeclared sandbox")
            info = be.create(self.sandbox_spec(decl))
            self.names[decl.ref] = info.name
            self.open.append(info.name)
            return
        if kind == "sandbox.connect":
            self.names[self.arg(a, "ref", str)] = be.connect(self.arg(a, "name", str)).name
            return
        if kind == "sandbox.list":
            be.list_sandboxes()
            return
        if ref is None or ref not in self.names:
            raise InvalidArgument(f"operation {op.seq} ({kind}) names no live sandbox")
        sb = self.names[ref]
        if kind == "sandbox.info":
            be.info(sb)
        elif kind == "sandbox.set_ttl":
            be.set_ttl(sb, self.arg(a, "ttl_seconds", float))
        elif kind == "sandbox.pause":
            be.pause(sb)
        elif kind == "sandbox.resume":
            be.resume(sb)
        elif kind == "sandbox.snapshot":
            be.snapshot(sb, self.arg(a, "name", str))
        elif kind == "sandbox.restore":
            be.restore(sb, self.arg(a, "snapshot", str))
            if sb not in self.open:
                self.open.append(sb)
        elif kind in ("sandbox.stop", "sandbox.destroy"):
            try:
                (be.stop if kind == "sandbox.stop" else be.destroy)(sb)
            except SandboxNotFound:
                pass
            if sb in self.open:
                self.open.remove(sb)
        elif kind == "commands.run":
            fields = {k: v for k, v in a.items() if k not in ("check", "stdin")}
            req = convert(fields, M.ExecRequest, f"operation {op.seq}")
            if "stdin" in a:
                req = msgspec.structs.replace(req, stdin=self.blob(a["stdin"]))
            check = bool(a.get("check", False))
            res = be.run(sb, req, check)
            self.out.write(res.stdout_bytes)
            self.err.write(res.stderr_bytes)
            self.out.flush()
            self.err.flush()
            finish(res, req.argv, req.timeout, check)
        elif kind == "commands.start":
            fields = {k: v for k, v in a.items() if k not in ("proc", "stdin")}
            preq = convert(fields, M.ProcStart, f"operation {op.seq}")
            if "stdin" in a:
                preq = msgspec.structs.replace(preq, stdin=self.blob(a["stdin"]))
            self.procs[(ref, self.arg(a, "proc", int))] = be.start(sb, preq).proc
        elif kind.startswith("proc."):
            proc = self.procs.get((ref, self.arg(a, "proc", int)))
            if proc is None:
                raise InvalidArgument(f"operation {op.seq} names a process never started")
            if kind == "proc.wait":
                be.proc_wait(sb, proc, self.arg(a, "timeout", float))
            elif kind == "proc.signal":
                be.proc_signal(sb, proc, self.arg(a, "signal", int))
            elif kind == "proc.stdin":
                be.proc_stdin(sb, proc, self.blob(a.get("data")), bool(a.get("eof")))
            else:
                self.out.write(be.proc_output(sb, proc, self.arg(a, "stream", str)))
        elif kind == "files.write":
            be.write(
                sb, self.arg(a, "path", str), self.blob(a.get("data")), self.arg(a, "mode", int)
            )
        elif kind == "files.read":
            be.read(sb, self.arg(a, "path", str))
        elif kind == "files.list":
            be.list_dir(sb, self.arg(a, "path", str))
        elif kind == "files.stat":
            path = self.arg(a, "path", str)  # a malformed operation is refused, not an answer
            try:
                be.stat(sb, path)
            except MvmError:
                pass  # the script may have asked exists(); a missing file is an answer
        elif kind == "files.mkdir":
            be.mkdir(sb, self.arg(a, "path", str), bool(a.get("parents")))
        elif kind == "files.remove":
            be.remove(sb, self.arg(a, "path", str), bool(a.get("recursive")))
        elif kind == "files.rename":
            be.rename(sb, self.arg(a, "src", str), self.arg(a, "dest", str))
        elif kind == "logs":
            for _ in be.logs(sb, False, None):  # never follow: the script decided when to stop
                pass
        elif kind == "ports.forward":
            fields = {k: v for k, v in a.items() if k != "id"}
            spec = convert(fields, M.PortSpec, f"operation {op.seq}")
            self.forwards[self.arg(a, "id", str)] = be.forward(sb, spec).id
        elif kind == "ports.close":
            fid = self.forwards.get(self.arg(a, "id", str))
            if fid is None:
                raise InvalidArgument(f"operation {op.seq} closes a forward never made")
            be.unforward(sb, fid)
        else:  # decode() admits only known ops
            raise InvalidArgument(f"operation {op.seq}: {kind} cannot be replayed")


def replay(directory: Path, out: BinaryIO, err: BinaryIO, backend: Backend | None = None) -> None:
    ir = IRm.load(directory)
    Replayer(directory, backend or LiveBackend(), out, err).run(ir)
