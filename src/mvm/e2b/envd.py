"""E2B's in-sandbox daemon (envd) over mvm's native API: processes, filesystem, files.

Connect RPC with the JSON codec (:mod:`mvm.e2b.connect`). An envd pid is mvm's process
number in the sandbox. Output streams are made by long-polling mvmd (wait up to
:data:`POLL` seconds, then fetch what is new), so a command's events arrive as they
happen and its end as soon as it exits. Every call is a native call through mvmd.
"""

from __future__ import annotations

import base64
import stat as st
from typing import Any, Final

import msgspec
from aiohttp import web

from mvm import errors, tenancy
from mvm.api import models as M
from mvm.e2b import connect as C
from mvm.serve.upstream import Upstream
from mvm.tokens import Identity

#: Seconds one long-poll of a running process waits.
POLL: Final = 1.0
#: Deepest ListDir recursion and most entries returned.
MAX_DEPTH: Final = 8
MAX_ENTRIES: Final = 10_000
SIGNALS: Final = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15}
TYPES: Final = {
    "file": "FILE_TYPE_FILE",
    "dir": "FILE_TYPE_DIRECTORY",
    "symlink": "FILE_TYPE_SYMLINK",
}
#: Output held back waiting for the end of its line, at most.
MAX_PENDING: Final = 64 * 1024
STREAM_CT: Final = "application/connect+json"
_CODES: Final = {
    400: "invalid_argument",
    403: "permission_denied",
    404: "not_found",
    409: "already_exists",
    413: "resource_exhausted",
    429: "resource_exhausted",
    502: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def rpc_error(ident: Identity, exc: errors.MvmError) -> RpcError:
    code = _CODES.get(errors.http_status(exc), "internal")
    if isinstance(exc, errors.AgentError) and exc.data.get("code") == "not_empty":
        code = "failed_precondition"
    return RpcError(code, tenancy.unprefix_text(ident.tenant, exc.message))


def unary_error(err: RpcError) -> web.Response:
    return web.json_response(
        {"code": err.code, "message": err.message}, status=C.CODE_STATUS[err.code]
    )


def _perm(mode: int) -> str:
    return st.filemode(mode)


def entry_info(
    path: str, name: str, kind: str, size: int, mode: int, mtime: float
) -> dict[str, Any]:
    from mvm.e2b.control import _iso

    return {
        "name": name,
        "type": TYPES.get(kind, "FILE_TYPE_UNSPECIFIED"),
        "path": path,
        "size": str(size),
        "mode": mode & 0o7777,
        "permissions": _perm(mode),
        "owner": "",
        "group": "",
        "modifiedTime": _iso(mtime),
    }


def _pid(body: dict[str, Any]) -> int:
    proc = body.get("process") or {}
    pid = proc.get("pid") if isinstance(proc, dict) else None
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise RpcError("invalid_argument", "select the process by pid (tags are not supported)")
    return pid


def _str(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise RpcError("invalid_argument", f"{key} is required")
    return v


class Envd:
    """The envd RPCs of one server, each for the sandbox named by ``E2b-Sandbox-Id``."""

    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    # -- unary ----------------------------------------------------------------------
    async def unary(self, ident: Identity, name: str, method: str, body: dict[str, Any]) -> Any:
        """One unary RPC: the response message, or RpcError."""
        handlers = {
            "process.Process/List": self.proc_list,
            "process.Process/SendSignal": self.send_signal,
            "process.Process/SendInput": self.send_input,
            "process.Process/CloseStdin": self.close_stdin,
            "filesystem.Filesystem/Stat": self.stat,
            "filesystem.Filesystem/ListDir": self.list_dir,
            "filesystem.Filesystem/MakeDir": self.make_dir,
            "filesystem.Filesystem/Move": self.move,
            "filesystem.Filesystem/Remove": self.remove,
        }
        fn = handlers.get(method)
        if fn is None:
            raise RpcError("unimplemented", f"{method} is not implemented by mvm's envd face")
        try:
            return await fn(ident, name, body)
        except errors.MvmError as exc:
            raise rpc_error(ident, exc) from None

    async def proc_list(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        views = await self.up.typed(list[M.ProcView], ident, "GET", f"/sandboxes/{name}/procs")
        return {
            "processes": [
                {"config": {"cmd": v.argv[0], "args": v.argv[1:], "envs": {}}, "pid": v.proc}
                for v in views
                if v.running and v.argv
            ]
        }

    async def send_signal(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        sig = SIGNALS.get(str(body.get("signal")), 15)
        await self.up.call(
            ident, "POST", f"/sandboxes/{name}/procs/{_pid(body)}/signal", params={"signal": sig}
        )
        return {}

    async def send_input(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        inp = body.get("input") or {}
        data = inp.get("stdin", inp.get("pty", "")) if isinstance(inp, dict) else ""
        try:
            raw = base64.b64decode(str(data), validate=True)
        except ValueError:
            raise RpcError("invalid_argument", "input is not base64") from None
        await self.up.call(ident, "POST", f"/sandboxes/{name}/procs/{_pid(body)}/stdin", data=raw)
        return {}

    async def close_stdin(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        await self.up.call(
            ident,
            "POST",
            f"/sandboxes/{name}/procs/{_pid(body)}/stdin",
            data=b"",
            params={"eof": 1},
        )
        return {}

    async def _stat(self, ident: Identity, name: str, path: str) -> dict[str, Any]:
        s = await self.up.typed(
            M.FileStat, ident, "GET", f"/sandboxes/{name}/files/stat", params={"path": path}
        )
        base = path.rstrip("/").rsplit("/", 1)[-1] or "/"
        return entry_info(path, base, s.type, s.size, s.mode, s.mtime)

    async def stat(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        return {"entry": await self._stat(ident, name, _str(body, "path"))}

    async def list_dir(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        root = _str(body, "path")
        depth = body.get("depth", 1)
        depth = max(1, min(int(depth) if isinstance(depth, int) else 1, MAX_DEPTH))
        out: list[dict[str, Any]] = []
        todo = [(root.rstrip("/") or "/", 1)]
        while todo and len(out) < MAX_ENTRIES:
            path, level = todo.pop(0)
            entries = await self.up.typed(
                list[M.FileEntry],
                ident,
                "GET",
                f"/sandboxes/{name}/files/list",
                params={"path": path},
            )
            for e in entries:
                full = f"{path.rstrip('/')}/{e.name}"
                out.append(entry_info(full, e.name, e.type, e.size, e.mode, e.mtime))
                if e.type == "dir" and level < depth:
                    todo.append((full, level + 1))
        return {"entries": out[:MAX_ENTRIES]}

    async def make_dir(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        path = _str(body, "path")
        try:
            await self._stat(ident, name, path)
        except errors.MvmError as exc:
            if errors.http_status(exc) != 404:
                raise
        else:
            raise RpcError("already_exists", f"directory {path} already exists")
        await self.up.call(
            ident, "POST", f"/sandboxes/{name}/files/mkdir", params={"path": path, "parents": 1}
        )
        return {"entry": await self._stat(ident, name, path)}

    async def move(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        src, dest = _str(body, "source"), _str(body, "destination")
        await self.up.call(
            ident, "POST", f"/sandboxes/{name}/files/move", params={"path": src, "dest": dest}
        )
        return {"entry": await self._stat(ident, name, dest)}

    async def remove(self, ident: Identity, name: str, body: dict[str, Any]) -> Any:
        await self.up.call(
            ident,
            "DELETE",
            f"/sandboxes/{name}/files",
            params={"path": _str(body, "path"), "recursive": 1},
        )
        return {}

    # -- streams --------------------------------------------------------------------
    async def start(
        self, ident: Identity, name: str, body: dict[str, Any], user: str | None = None
    ) -> int:
        """Start ``body.process``; its mvm process number (the envd pid)."""
        proc = body.get("process")
        if not isinstance(proc, dict) or not isinstance(proc.get("cmd"), str):
            raise RpcError("invalid_argument", "process.cmd is required")
        if body.get("pty"):
            raise RpcError("unimplemented", "pty processes are not supported by mvm")
        args = proc.get("args") or []
        envs = proc.get("envs") or {}
        if not isinstance(args, list) or not isinstance(envs, dict):
            raise RpcError("invalid_argument", "process.args / process.envs malformed")
        req = M.ProcStart(
            argv=[proc["cmd"], *map(str, args)],
            env={str(k): str(v) for k, v in envs.items()},
            cwd=proc.get("cwd") or None,
            stdin_open=bool(body.get("stdin", False)),
            user=user,
        )
        try:
            view = await self.up.typed(
                M.ProcView, ident, "POST", f"/sandboxes/{name}/procs", json=req
            )
        except errors.MvmError as exc:
            raise rpc_error(ident, exc) from None
        return int(view.proc)

    async def stream(self, ident: Identity, name: str, pid: int, resp: web.StreamResponse) -> None:
        """Write start, data and end events of process ``pid`` until it ends."""
        await resp.write(C.encode({"event": {"start": {"pid": pid}}}))
        sent = {"stdout": 0, "stderr": 0}  # bytes of (redacted) output sent
        raw = {"stdout": 0, "stderr": 0}  # the guest's byte counts when last fetched
        base = f"/sandboxes/{name}/procs/{pid}"
        try:
            while True:
                view = await self.up.typed(
                    M.ProcView,
                    ident,
                    "POST",
                    f"{base}/wait",
                    params={"timeout": POLL},
                    timeout=POLL + 60.0,
                )
                for stream, count in (("stdout", view.stdout_bytes), ("stderr", view.stderr_bytes)):
                    if count != raw[stream] or not view.running:
                        raw[stream] = count
                        data = await self.up.call(
                            ident, "GET", f"{base}/output", params={"stream": stream}
                        )
                        new = _ready(data[sent[stream] :], view.running)
                        if new:
                            sent[stream] += len(new)
                            b64 = base64.b64encode(new).decode()
                            await resp.write(C.encode({"event": {"data": {stream: b64}}}))
                if not view.running:
                    break
        except errors.MvmError as exc:
            err = rpc_error(ident, exc)
            await resp.write(C.end_frame(err.code, err.message))
            return
        code = view.exit_code if view.exit_code is not None else -1
        end: dict[str, Any] = {"exitCode": code, "exited": view.signal is None}
        end["status"] = (
            f"signal: {view.signal}" if view.signal is not None else f"exit status {code}"
        )
        await resp.write(C.encode({"event": {"end": end}}))
        await resp.write(C.end_frame())


def _ready(new: bytes, running: bool) -> bytes:
    """What of ``new`` output may be sent now. mvmd redacts secret values in the whole
    output on every fetch; while the process runs, only complete lines are sent, so a
    value cut by the end of a fetch is never sent half-redacted (a line longer than
    :data:`MAX_PENDING` goes anyway)."""
    if not running or len(new) >= MAX_PENDING:
        return new
    return new[: new.rfind(b"\n") + 1]


def decode_request(raw: bytes, streaming: bool) -> dict[str, Any]:
    """The request message of a unary (plain JSON) or server-streaming (one envelope) call."""
    try:
        if streaming:
            frames = C.decode_all(raw)
            msg = frames[0][1] if frames else {}
        else:
            msg = msgspec.json.decode(raw) if raw.strip() else {}
    except (C.EnvelopeError, msgspec.DecodeError) as exc:
        raise RpcError("invalid_argument", f"malformed request: {exc}") from None
    if not isinstance(msg, dict):
        raise RpcError("invalid_argument", "request must be a JSON object")
    return msg
