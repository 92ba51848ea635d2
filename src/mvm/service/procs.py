"""Background processes in a sandbox: start (policy, secrets, audit), list, wait, signal,
stdin, output (redacted)."""

from __future__ import annotations

from typing import Any

import msgspec

from mvm import audit
from mvm.agent.protocol import MAX_PAYLOAD
from mvm.api import models as M
from mvm.errors import InvalidArgument
from mvm.service.core import Core
from mvm.service.execs import check_command
from mvm.service.imagedefaults import ImageDefaults
from mvm.service.live import Live, audit_after


def _view(p: Any) -> M.ProcView:
    return msgspec.convert(msgspec.to_builtins(p), M.ProcView)


class Procs:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.defaults = ImageDefaults(core)

    async def start(self, name: str, req: M.ProcStart) -> M.ProcView:
        if req.argv:  # an empty one is the image's command (below)
            check_command(req.argv, req.env, req.cwd, req.user)
        live, agent = self.core.running(name)
        req = self.defaults.apply(live, req)  # the image's command, user and cwd if unset
        check_command(req.argv, req.env, req.cwd, req.user)
        env = self.core.command_env(live, req.env, req.secret_env, req.user)
        check_command(req.argv, env, req.cwd, req.user)
        p = await agent.proc_start(
            req.argv,
            env=env,
            cwd=req.cwd,
            user=req.user,
            stdin=req.stdin,
            stdin_open=req.stdin_open,
        )
        view = _view(p)
        live.procs[view.proc] = None
        if live.proclog is not None:
            live.proclog.start(view.proc)
        view.audit_id = audit_after(
            "proc.started",
            live.name,
            proc=view.proc,
            argv_sha256=audit.argv_sha256(req.argv),
            argc=len(req.argv),
            env_keys=sorted([*live.rec.env, *req.env]),
        )
        return view

    async def all(self, name: str) -> list[M.ProcView]:
        _, agent = self.core.running(name)
        return [_view(p) for p in await agent.proc_list()]

    def _exited(self, live: Live, p: Any) -> M.ProcView:
        """The view, with the audit id of the exit record once the process has ended."""
        view = _view(p)
        if not view.running:
            view.audit_id = self.core.proc_exited(live, view.proc, view.exit_code, view.signal)
        return view

    async def wait(self, name: str, proc: int, timeout: float) -> M.ProcView:
        live, agent = self.core.running(name)
        return self._exited(live, await agent.proc_wait(proc, max(0.0, min(timeout, 3600.0))))

    async def signal(self, name: str, proc: int, sig: int) -> M.ProcView:
        if not 1 <= sig <= 64:
            raise InvalidArgument("signal must be between 1 and 64")
        live, agent = self.core.running(name)
        p = await agent.proc_signal(proc, sig)
        audit_after("proc.signalled", live.name, proc=proc, signal=sig)
        return self._exited(live, p)

    async def stdin(self, name: str, proc: int, data: bytes, eof: bool) -> None:
        live, agent = self.core.running(name)
        view = memoryview(data)
        while len(view) > MAX_PAYLOAD:
            await agent.proc_stdin(proc, bytes(view[:MAX_PAYLOAD]))
            view = view[MAX_PAYLOAD:]
        await agent.proc_stdin(proc, bytes(view), eof=eof)
        # Size only: stdin is often short and typed (a hash of "y" or a PIN says too much).
        audit_after("proc.stdin", live.name, proc=proc, size=len(data), eof=eof)

    async def output(self, name: str, proc: int, stream: str) -> bytes:
        live, agent = self.core.running(name)
        out = bytearray()
        offset = 0
        while True:
            data, meta = await agent.proc_output(proc, stream, offset)
            if not data:
                break
            out += data
            offset = meta.offset + len(data)
            if offset >= meta.end:
                break
        return live.redactor.redact_bytes(bytes(out))
