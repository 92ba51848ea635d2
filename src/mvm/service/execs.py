"""One command in a sandbox, streamed: policy (secrets, user), secret injection, output
capped and redacted as it streams, audited before it starts and after it ends."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from mvm import audit
from mvm.agent import protocol as P
from mvm.agent.client import exec_reply
from mvm.api import models as M
from mvm.errors import InvalidArgument
from mvm.service.core import Core
from mvm.service.imagedefaults import ImageDefaults
from mvm.service.live import audit_after, audit_before


def check_command(
    argv: list[str], env: dict[str, str], cwd: str | None, user: str | None = None
) -> None:
    """Refuse, naming the limit, a command the agent would refuse (``P.command_spec``:
    one argument or ``KEY=VALUE`` at most ``P.MAX_ARG`` bytes, all of them at most
    ``P.MAX_SPEC``), before anything is sent or audited. Large commands travel in the
    frame's payload, so the header's size is not the limit."""
    try:
        P.command_spec(argv, env, cwd)
    except ValueError as exc:
        raise InvalidArgument(
            str(exc), hint="pass large data through a file or stdin", limit=P.MAX_SPEC
        ) from None


class Execs:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.defaults = ImageDefaults(core)

    def prepare(self, name: str, req: M.ExecRequest) -> M.ExecRequest:
        """Everything that can refuse an exec before its stream starts (so the refusal is
        a plain error answer, not an event inside a started stream). Returns ``req`` with
        the image's command, user and cwd where it left them unset."""
        if req.argv:  # an empty one is the image's command (below)
            check_command(req.argv, req.env, req.cwd, req.user)
        if not 0 < req.timeout <= M.MAX_TTL:
            raise InvalidArgument("timeout must be positive and at most a week")
        live, _ = self.core.running(name)
        req = self.defaults.apply(live, req)
        check_command(req.argv, req.env, req.cwd, req.user)
        self.core.gate.exec(live.name, list(req.secret_env.values()), req.user)
        return req

    async def stream(self, name: str, req: M.ExecRequest) -> AsyncIterator[M.ExecEvent]:
        core = self.core
        req = self.prepare(name, req)
        live, agent = core.running(name)
        env = core.command_env(live, req.env, req.secret_env, req.user)
        check_command(req.argv, env, req.cwd, req.user)
        redactors = {"stdout": live.redactor.stream(), "stderr": live.redactor.stream()}
        # Fail closed: no audit record, no exec. Output is hashed as it streams by.
        audit_before(
            "cmd.exec.started",
            live.name,
            argv_sha256=audit.argv_sha256(req.argv),
            argc=len(req.argv),
            env_keys=sorted(env),
            secret_env_keys=sorted(req.secret_env),
            cwd=req.cwd,
            user=req.user,
            timeout=req.timeout,
            stdin_bytes=len(req.stdin),
            stdin_sha256=audit.sha256_hex(req.stdin),
        )
        digests = {"stdout": hashlib.sha256(), "stderr": hashlib.sha256()}
        sizes = {"stdout": 0, "stderr": 0}
        received = {"stdout": 0, "stderr": 0}  # raw bytes from the guest, per stream
        t0 = time.monotonic()
        finished = False

        def outputs() -> dict[str, Any]:
            return {
                f"{s}_{k}": v
                for s in ("stdout", "stderr")
                for k, v in (("sha256", digests[s].hexdigest()), ("bytes", sizes[s]))
            }

        def counted(stream: str, data: bytes) -> M.ExecEvent:
            digests[stream].update(data)
            sizes[stream] += len(data)
            return M.ExecEvent(type=stream, data=data)

        try:
            async for frame in agent.exec_stream(
                req.argv,
                env=env,
                cwd=req.cwd,
                user=req.user,
                stdin=req.stdin,
                timeout=req.timeout,
                output_limit=req.output_limit,
                detach=req.detach,
            ):
                if frame.type == P.OUT:
                    stream = frame.header.get("stream")
                    if stream in ("stdout", "stderr"):
                        # The guest's word on output_limit is not trusted: cap it here too.
                        room = max(0, req.output_limit - received[str(stream)])
                        received[str(stream)] += len(frame.payload)
                        payload = frame.payload[:room]
                        # Redacted before it is hashed or leaves: audit sees what clients see.
                        data = redactors[str(stream)].feed(payload) if payload else b""
                        if data:
                            yield counted(str(stream), data)
                elif frame.type == P.OK:
                    for s_name, sr in redactors.items():
                        tail = sr.flush()
                        if tail:
                            yield counted(s_name, tail)
                    reply = exec_reply(frame)
                    finished = True
                    cut = {k: v > req.output_limit for k, v in received.items()}
                    trunc_out = reply.truncated.stdout or cut["stdout"]
                    trunc_err = reply.truncated.stderr or cut["stderr"]
                    aid = audit_after(
                        "cmd.exec.finished",
                        live.name,
                        exit_code=reply.exit_code,
                        timed_out=reply.timed_out,
                        signal=reply.signal,
                        # The guest's number: a NaN/inf must not make the record unwritable.
                        duration=(
                            round(reply.duration, 6) if math.isfinite(reply.duration) else None
                        ),
                        truncated_stdout=trunc_out,
                        truncated_stderr=trunc_err,
                        **outputs(),
                    )
                    yield M.ExecEvent(
                        type="exit",
                        exit_code=reply.exit_code,
                        timed_out=reply.timed_out,
                        signal=reply.signal,
                        duration=reply.duration,
                        truncated_stdout=trunc_out,
                        truncated_stderr=trunc_err,
                        audit_id=aid,
                    )
        finally:
            if not finished:  # error, or the client went away: still close the pair
                audit_after(
                    "cmd.exec.finished",
                    live.name,
                    exit_code=None,
                    aborted=True,
                    duration=round(time.monotonic() - t0, 6),
                    **outputs(),
                )

    async def run(
        self, name: str, req: M.ExecRequest, on_output: M.OutputSink | None = None
    ) -> M.ExecResult:
        """The command to completion, as the one ``ExecResult``."""
        return await M.agather_exec(self.stream(name, req), on_output)
