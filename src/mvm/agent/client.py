"""Host side of the agent protocol (asyncio): the requests a host makes of the guest
agent, over one multiplexed connection (``mux``).

The guest is untrusted. Everything read here is bounded: the decoder is strict
(any framing violation fails the connection and is reported as
AgentProtocolError), replies are validated before use (``replies``), per-request
queues are bounded (backpressure onto the guest), and output is capped on the host
regardless of what the guest claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from mvm.agent import protocol as P
from mvm.agent.guest import cgroups
from mvm.agent.mux import CALL_TIMEOUT, QUEUE_FRAMES, AgentConnection
from mvm.agent.replies import (
    NAME_MAX,
    Entry,
    ExecReply,
    ExecResult,
    OutputCallback,
    ProcInfo,
    ProcOutput,
    ProcStarted,
    Stat,
    Truncated,
    bad_entry_name,
    checked,
    command_frame,
    convert,
    exec_reply,
)
from mvm.agent.tcpstream import TcpStream
from mvm.errors import (
    AgentError,
    AgentProtocolError,
    CommandTimeout,
    InvalidArgument,
    MvmError,
    VMDied,
)

__all__ = [
    "CALL_TIMEOUT",
    "NAME_MAX",
    "QUEUE_FRAMES",
    "AgentClient",
    "Entry",
    "ExecReply",
    "ExecResult",
    "OutputCallback",
    "ProcInfo",
    "ProcOutput",
    "ProcStarted",
    "Stat",
    "TcpStream",
    "Truncated",
    "bad_entry_name",
    "command_frame",
    "exec_reply",
]

#: Largest file ``read_file`` returns unless told otherwise.
DEFAULT_READ_LIMIT = 64 * 1024 * 1024
#: Seconds the host waits beyond a command's own timeout before giving up on the guest.
TIMEOUT_GRACE = 20.0
#: Seconds between hellos after a reply with the wrong nonce.
HELLO_RETRY_PAUSE = 0.05
#: Bound on telling the guest to kill a command the host abandoned.
ABANDON_TIMEOUT = 10.0


def check_limits(limits: dict[str, int]) -> dict[str, int]:
    """Per-sandbox command limits by the guest agent's own rule (``cgroups.check_limits``),
    or InvalidArgument naming ``limits``."""
    try:
        return cgroups.check_limits(limits)
    except ValueError as exc:
        raise InvalidArgument(f"limits: {exc}") from None


class AgentClient(AgentConnection):
    """The agent's requests: handshake, exec, files, background processes, TCP relays."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.info: dict[str, Any] = {}
        #: Per-sandbox limits of the guest's command cgroups, sent with every hello
        #: (``{"pids_max": n, "memory_pct": p}``, see ``set_limits``); None: the defaults.
        self.limits: dict[str, int] | None = None
        #: Fire-and-forget tasks (killing abandoned commands), kept so they are not collected.
        self._background: set[asyncio.Task[None]] = set()
        #: Sent in every hello: a guest seeing a new session drops the old host's TCP relays.
        self.session = secrets.token_hex(8)

    # -- handshake --------------------------------------------------------------
    def set_limits(self, *, pids_max: int | None = None, memory_pct: int | None = None) -> None:
        """Limits for each command's cgroup in the guest, applied from the next hello on:
        ``pids_max`` tasks per command, ``memory_pct`` percent of the commands' memory."""
        limits = {
            k: v for k, v in (("pids_max", pids_max), ("memory_pct", memory_pct)) if v is not None
        }
        self.limits = check_limits(limits)

    async def hello(
        self, timeout: float, alive: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """Handshake: repeat hello (fresh nonce) until the guest echoes the latest one.

        Also sets the guest clock and mixes host randomness into the guest RNG, which
        matters after a snapshot restore.
        """
        deadline = time.monotonic() + timeout
        while True:
            if alive is not None and not alive():
                raise VMDied("the VM exited before its agent answered")
            nonce = secrets.token_hex(8)
            header = {
                "nonce": nonce,
                "version": P.PROTOCOL_VERSION,
                "time": time.time(),
                "seed": os.urandom(32).hex(),
                "session": self.session,
            }
            if self.limits:
                header["limits"] = self.limits
            try:
                frame = await self.call(
                    P.HELLO, header, timeout=min(1.0, deadline - time.monotonic())
                )
            except CommandTimeout:
                if time.monotonic() >= deadline:
                    raise
                continue
            if frame.header.get("nonce") != nonce:
                # Stale (a previous host's) or forged: pause, so a guest that always
                # answers wrongly gets a few hellos per second instead of a busy host.
                await asyncio.sleep(min(HELLO_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
                continue
            version = frame.header.get("version")
            if version != P.PROTOCOL_VERSION:
                raise AgentProtocolError(
                    f"guest agent speaks protocol {version!r}, host speaks {P.PROTOCOL_VERSION}"
                )
            self.info = {k: v for k, v in frame.header.items() if isinstance(v, (str, int))}
            return self.info

    async def ping(self, timeout: float = CALL_TIMEOUT) -> None:
        await self.call(P.PING, timeout=timeout)

    # -- exec -------------------------------------------------------------------
    async def exec_stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes = b"",
        timeout: float | None = None,
        output_limit: int = P.DEFAULT_OUTPUT_LIMIT,
        detach: bool = False,
    ) -> AsyncIterator[P.Frame]:
        """Start a command; yield OUT/STARTED frames, then the final OK frame.

        When it ends, the guest kills whatever it left running (its cgroup), unless
        ``detach``: then those processes run on."""
        header, stdin = command_frame(argv, env, cwd, stdin)
        header["output_limit"] = output_limit
        if detach:
            header["detach"] = True
        if user is not None:
            header["user"] = user
        if timeout is not None:
            header["timeout"] = timeout
        rid, q = self._open()
        finished = False
        try:
            await self._send({**header, "t": P.EXEC, "id": rid}, stdin)
            deadline = None if timeout is None else time.monotonic() + timeout + TIMEOUT_GRACE
            while True:
                frame = await self._next(q, deadline)
                if frame.type in (P.OK, P.ERR):
                    finished = True
                if frame.type == P.ERR:
                    checked(frame, "exec")
                yield frame
                if frame.type == P.OK:
                    return
        finally:
            self._pending.pop(rid, None)
            if not finished and self._failure is None:
                # Abandoned (cancelled, timed out on the host, consumer gone): the guest
                # must not keep running it. A task of its own, as this generator may be
                # closing inside a cancelled task.
                try:
                    task = asyncio.get_running_loop().create_task(self._kill_abandoned(rid))
                except RuntimeError:  # collected outside the loop: nothing can be sent
                    pass
                else:
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _kill_abandoned(self, rid: int) -> None:
        """SIGKILL the process group of an exec nobody waits for any more (bounded)."""
        with contextlib.suppress(MvmError, OSError):
            await self.call(
                P.SIGNAL, {"ref": rid, "signal": 9, "group": True}, timeout=ABANDON_TIMEOUT
            )

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes = b"",
        timeout: float | None = None,
        output_limit: int = P.DEFAULT_OUTPUT_LIMIT,
        on_output: OutputCallback | None = None,
        detach: bool = False,
    ) -> ExecResult:
        """Run a command to completion; output is capped at ``output_limit`` per stream."""
        bufs = {"stdout": bytearray(), "stderr": bytearray()}
        host_trunc = {"stdout": False, "stderr": False}
        started = time.monotonic()
        async for frame in self.exec_stream(
            argv,
            env=env,
            cwd=cwd,
            user=user,
            stdin=stdin,
            timeout=timeout,
            output_limit=output_limit,
            detach=detach,
        ):
            if frame.type == P.OUT:
                stream = frame.header.get("stream")
                if stream not in bufs:
                    raise AgentProtocolError(f"exec: output on unknown stream {stream!r}")
                buf = bufs[stream]
                room = output_limit - len(buf)
                data = frame.payload
                if len(data) > room:
                    data = data[: max(0, room)]
                    host_trunc[stream] = True
                if data:
                    buf += data
                    if on_output is not None:
                        on_output(stream, data)
            elif frame.type == P.OK:
                reply: ExecReply = convert(frame, ExecReply, "exec")
                return ExecResult(
                    exit_code=reply.exit_code,
                    stdout=bytes(bufs["stdout"]),
                    stderr=bytes(bufs["stderr"]),
                    duration=time.monotonic() - started,
                    timed_out=reply.timed_out,
                    truncated_stdout=reply.truncated.stdout or host_trunc["stdout"],
                    truncated_stderr=reply.truncated.stderr or host_trunc["stderr"],
                    signal=reply.signal,
                )
        raise AgentProtocolError("exec: the guest ended the stream without a result")

    # -- files ------------------------------------------------------------------
    async def read_file(self, path: str, *, limit: int = DEFAULT_READ_LIMIT) -> bytes:
        """Whole file, in chunks; AgentError(code=too_large) past ``limit`` bytes."""
        out = bytearray()
        while True:
            frame = await self.call(
                P.FS_READ, {"path": path, "offset": len(out), "length": P.MAX_PAYLOAD}
            )
            out += frame.payload
            if len(out) > limit:
                raise AgentError(
                    f"{path}: larger than the limit of {limit} bytes",
                    code=P.E_TOO_LARGE,
                    limit=limit,
                )
            if frame.header.get("eof") is True or not frame.payload:
                return bytes(out)

    async def write_file(
        self, path: str, data: bytes, *, mode: int = 0o644, owner: str | None = None
    ) -> int:
        """Write (create or replace) a file, in chunks. Returns its size."""
        view = memoryview(data)
        offset = 0
        size = 0
        while True:
            chunk = bytes(view[offset : offset + P.MAX_PAYLOAD])
            header: dict[str, Any] = {
                "path": path,
                "offset": offset,
                "mode": mode,
                "truncate": offset == 0,
            }
            if owner is not None:
                header["owner"] = owner
            frame = await self.call(P.FS_WRITE, header, chunk)
            s = frame.header.get("size")
            size = s if isinstance(s, int) else 0
            offset += len(chunk)
            if offset >= len(data):
                return size

    async def list_dir(self, path: str) -> list[Entry]:
        frame = await self.call(P.FS_LIST, {"path": path})
        raw = frame.header.get("entries")
        try:
            entries = msgspec.convert(raw, list[Entry], strict=True)
        except msgspec.ValidationError as exc:
            raise AgentProtocolError(f"fs.list: malformed reply from the guest: {exc}") from None
        for e in entries:
            problem = bad_entry_name(e.name)
            if problem is not None:
                raise AgentProtocolError(
                    f"fs.list: the guest sent an impossible entry name ({problem}): {e.name[:80]!r}"
                )
        return entries

    async def stat(self, path: str) -> Stat:
        frame = await self.call(P.FS_STAT, {"path": path})
        result: Stat = convert(frame, Stat, "fs.stat")
        return result

    async def mkdir(self, path: str, *, parents: bool = False) -> None:
        await self.call(P.FS_MKDIR, {"path": path, "parents": parents})

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self.call(P.FS_REMOVE, {"path": path, "recursive": recursive})

    async def move(self, src: str, dest: str) -> None:
        await self.call(P.FS_MOVE, {"path": src, "dest": dest})

    # -- background processes -----------------------------------------------------
    async def proc_start(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes = b"",
        stdin_open: bool = False,
    ) -> ProcInfo:
        header, stdin = command_frame(argv, env, cwd, stdin)
        header["stdin_open"] = stdin_open
        if user is not None:
            header["user"] = user
        frame = await self.call(P.PROC_START, header, stdin)
        started: ProcStarted = convert(frame, ProcStarted, "proc.start")
        return await self.proc_wait(started.proc, 0)

    async def proc_list(self) -> list[ProcInfo]:
        frame = await self.call(P.PROC_LIST)
        try:
            return msgspec.convert(frame.header.get("procs"), list[ProcInfo], strict=True)
        except msgspec.ValidationError as exc:
            raise AgentProtocolError(f"proc.list: malformed reply from the guest: {exc}") from None

    async def proc_wait(self, proc: int, timeout: float) -> ProcInfo:
        """State of a background process, waiting up to ``timeout`` s for it to end."""
        frame = await self.call(
            P.PROC_WAIT, {"proc": proc, "timeout": timeout}, timeout=timeout + CALL_TIMEOUT
        )
        info: ProcInfo = convert(frame, ProcInfo, "proc.wait")
        return info

    async def proc_output(
        self, proc: int, stream: str, offset: int, length: int = P.MAX_PAYLOAD
    ) -> tuple[bytes, ProcOutput]:
        frame = await self.call(
            P.PROC_OUTPUT, {"proc": proc, "stream": stream, "offset": offset, "length": length}
        )
        meta: ProcOutput = convert(frame, ProcOutput, "proc.output")
        return frame.payload, meta

    async def proc_stdin(self, proc: int, data: bytes, *, eof: bool = False) -> None:
        await self.call(P.PROC_STDIN, {"proc": proc, "eof": eof}, data)

    async def proc_signal(self, proc: int, signal: int) -> ProcInfo:
        frame = await self.call(P.PROC_SIGNAL, {"proc": proc, "signal": signal})
        info: ProcInfo = convert(frame, ProcInfo, "proc.signal")
        return info

    async def shutdown(self) -> None:
        await self.call(P.SHUTDOWN, timeout=5.0)

    # -- TCP relays -------------------------------------------------------------------
    async def tcp_open(self, port: int, timeout: float = CALL_TIMEOUT) -> TcpStream:
        """Connect to 127.0.0.1:``port`` inside the guest; AgentError(connection_refused)
        when nothing listens there."""
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"guest port {port} is not in 1-65535")
        rid, q = self._open()
        try:
            await self._send({"t": P.TCP_OPEN, "id": rid, "port": port})
            frame = await self._next(q, time.monotonic() + timeout)
            if frame.type != P.STARTED:
                checked(frame, "tcp.open")  # err -> AgentError; a stray ok -> protocol error
                raise AgentProtocolError("tcp.open: the guest ended the relay before starting it")
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return TcpStream(self, rid, q)
