"""Host side of the agent protocol (asyncio): multiplexed requests over one connection.

The guest is untrusted. Everything read here is bounded: the decoder is strict
(any framing violation fails the connection and is reported as
AgentProtocolError), replies are validated before use, per-request queues are
bounded (backpressure onto the guest), and output is capped on the host
regardless of what the guest claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mvm.agent import protocol as P
from mvm.agent.guest import cgroups
from mvm.errors import (
    AgentError,
    AgentProtocolError,
    CommandTimeout,
    InvalidArgument,
    MvmError,
    VMDied,
)

#: Frames a request may have waiting before the reader stops reading (backpressure).
QUEUE_FRAMES = 16
#: Largest file ``read_file`` returns unless told otherwise.
DEFAULT_READ_LIMIT = 64 * 1024 * 1024
#: Seconds the host waits beyond a command's own timeout before giving up on the guest.
TIMEOUT_GRACE = 20.0
#: Seconds between hellos after a reply with the wrong nonce.
HELLO_RETRY_PAUSE = 0.05
#: Default timeout for small requests (fs, ping).
CALL_TIMEOUT = 30.0
#: Bound on telling the guest to kill a command the host abandoned.
ABANDON_TIMEOUT = 10.0


class Truncated(msgspec.Struct, frozen=True):
    stdout: bool = False
    stderr: bool = False


class ExecReply(msgspec.Struct, frozen=True):
    """The guest's final answer to an exec (validated: the guest may lie, never crash us)."""

    exit_code: int
    timed_out: bool = False
    signal: int | None = None
    duration: float = 0.0
    truncated: Truncated = Truncated()


class Entry(msgspec.Struct, frozen=True):
    name: str
    type: str
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0


class Stat(msgspec.Struct, frozen=True):
    type: str
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0


class ProcStarted(msgspec.Struct, frozen=True):
    proc: int
    pid: int


class ProcInfo(msgspec.Struct, frozen=True):
    """A background process as the guest reports it."""

    proc: int
    pid: int
    argv: list[str]
    running: bool
    started: float
    exit_code: int | None = None
    signal: int | None = None
    ended: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0


class ProcOutput(msgspec.Struct, frozen=True):
    offset: int
    lost: int
    end: int
    running: bool


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool
    truncated_stdout: bool
    truncated_stderr: bool
    signal: int | None = None


OutputCallback = Callable[[str, bytes], None]


#: Longest directory entry name a Linux guest can have (NAME_MAX), in UTF-8 bytes.
NAME_MAX = 255


def bad_entry_name(name: str) -> str | None:
    """Why ``name`` cannot be one entry of a directory listing (None if it can).

    Callers join entry names to paths (``cp -r`` out of a sandbox, the SDK): a guest
    that answers ``..``, ``a/b`` or a name with a NUL is lying, never listing.
    """
    if name in ("", ".", ".."):
        return "empty, '.' or '..'"
    if "/" in name or "\x00" in name:
        return "contains '/' or NUL"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"longer than {NAME_MAX} bytes"
    return None


def command_frame(
    argv: list[str], env: dict[str, str] | None, cwd: str | None, stdin: bytes
) -> tuple[dict[str, Any], bytes]:
    """Header fields and payload of an exec/proc.start: the command in the header, or, when
    it is too large for one, at the head of the payload (``"spec": N``) before stdin."""
    try:
        spec = P.command_spec(argv, env or {}, cwd)
    except ValueError as exc:
        raise InvalidArgument(str(exc), limit=P.MAX_SPEC) from None
    if len(spec) <= P.SPEC_IN_HEADER:
        header: dict[str, Any] = {"argv": argv, "env": env or {}}
        if cwd is not None:
            header["cwd"] = cwd
        if len(stdin) > P.MAX_PAYLOAD:
            raise InvalidArgument(f"stdin larger than {P.MAX_PAYLOAD} bytes", limit=P.MAX_PAYLOAD)
        return header, stdin
    if len(spec) + len(stdin) > P.MAX_PAYLOAD:
        raise InvalidArgument(
            f"a command of {len(spec)} bytes with {len(stdin)} bytes of stdin exceeds the "
            f"{P.MAX_PAYLOAD // 1024} KiB frame; pass large data as a file",
            limit=P.MAX_PAYLOAD,
        )
    return {"spec": len(spec)}, spec + stdin


def _checked(frame: P.Frame, what: str) -> P.Frame:
    if frame.type == P.ERR:
        code = frame.header.get("code")
        msg = frame.header.get("message")
        code = code if isinstance(code, str) else P.E_INTERNAL
        msg = msg[:2000] if isinstance(msg, str) else "error"
        raise AgentError(f"{what}: {msg}", code=code)
    if frame.type != P.OK:
        raise AgentProtocolError(f"{what}: unexpected reply type {frame.type!r}")
    return frame


def _convert(frame: P.Frame, typ: type[Any], what: str) -> Any:
    try:
        return msgspec.convert(frame.header, typ, strict=True)
    except msgspec.ValidationError as exc:
        raise AgentProtocolError(f"{what}: malformed reply from the guest: {exc}") from None


class AgentClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = P.FrameDecoder(strict=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[P.Frame | BaseException]] = {}
        self._write_lock = asyncio.Lock()
        self._failure: BaseException | None = None
        self._task = asyncio.create_task(self._read_loop())
        self.dropped_frames = 0
        #: time.monotonic() when the guest last sent anything (mvmd's health check).
        self.last_heard = time.monotonic()
        self.info: dict[str, Any] = {}
        #: Per-sandbox limits of the guest's command cgroups, sent with every hello
        #: (``{"pids_max": n, "memory_pct": p}``, see ``set_limits``); None: the defaults.
        self.limits: dict[str, int] | None = None
        #: Fire-and-forget tasks (killing abandoned commands), kept so they are not collected.
        self._background: set[asyncio.Task[None]] = set()
        #: Called (synchronously, must not block) with each unsolicited event frame.
        self.on_event: Callable[[P.Frame], None] | None = None
        #: Sent in every hello: a guest seeing a new session drops the old host's TCP relays.
        self.session = secrets.token_hex(8)

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> AgentClient:
        """Connect to the agent's chardev socket. A refused connection is retried within
        ``timeout``: QEMU creates the socket file at bind() and listens a moment later."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(path), limit=P.MAX_BODY + 64),
                    max(deadline - time.monotonic(), 0.01),
                )
                return cls(reader, writer)
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() + 0.02 > deadline:
                    raise
                await asyncio.sleep(0.02)

    # -- plumbing ---------------------------------------------------------------
    @property
    def failure(self) -> BaseException | None:
        return self._failure

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._reader.read(P.CHUNK)
                except (ConnectionError, OSError) as exc:
                    raise VMDied(f"the guest agent connection failed: {exc}") from None
                if not data:
                    raise VMDied("the guest agent connection closed (the VM stopped or crashed)")
                self.last_heard = time.monotonic()
                try:
                    frames = self._decoder.feed(data)
                except P.FrameError as exc:
                    raise AgentProtocolError(f"the guest broke the agent protocol: {exc}") from None
                for frame in frames:
                    if frame.type == P.EVENT:
                        if self.on_event is not None:
                            self.on_event(frame)
                        continue
                    q = self._pending.get(frame.id)
                    if q is None or frame.type not in P.REPLIES:
                        self.dropped_frames += 1  # stale (pre-handshake) or unasked-for
                        continue
                    await self._deliver(frame.id, q, frame)
        except asyncio.CancelledError:
            self._fail(VMDied("agent connection closed"))
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _deliver(
        self, rid: int, q: asyncio.Queue[P.Frame | BaseException], frame: P.Frame
    ) -> None:
        """Queue a frame; wait while the queue is full (backpressure), unless its request is gone."""
        while self._pending.get(rid) is q:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation (close() must always stop this loop).
                async with asyncio.timeout(0.5):
                    await q.put(frame)
                return
            except TimeoutError:
                continue
        self.dropped_frames += 1

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        for q in self._pending.values():
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(exc)

    async def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._failure is not None:
            raise self._failure
        data = P.encode(header, payload)
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise VMDied(f"cannot write to the guest agent: {exc}") from None

    def _open(self) -> tuple[int, asyncio.Queue[P.Frame | BaseException]]:
        rid = next(self._ids)
        q: asyncio.Queue[P.Frame | BaseException] = asyncio.Queue(QUEUE_FRAMES)
        if self._failure is not None:
            q.put_nowait(self._failure)
        self._pending[rid] = q
        return rid, q

    async def _next(
        self, q: asyncio.Queue[P.Frame | BaseException], deadline: float | None
    ) -> P.Frame:
        if q.empty() and self._failure is not None:
            raise self._failure
        try:
            async with asyncio.timeout_at(
                None
                if deadline is None
                else asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())
            ):
                item = await q.get()
        except TimeoutError:
            raise CommandTimeout("the guest agent did not answer in time") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def call(
        self,
        type_: str,
        header: dict[str, Any] | None = None,
        payload: bytes = b"",
        timeout: float = CALL_TIMEOUT,
    ) -> P.Frame:
        """One request, one final reply (ok, or AgentError)."""
        rid, q = self._open()
        try:
            await self._send({**(header or {}), "t": type_, "id": rid}, payload)
            deadline = time.monotonic() + timeout
            while True:
                frame = await self._next(q, deadline)
                if frame.type in (P.OK, P.ERR):
                    return _checked(frame, type_)
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        """Close the connection; bounded even if the guest keeps its end open."""
        self._writer.close()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5.0):
                await self._task
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5.0):
                await self._writer.wait_closed()

    # -- handshake --------------------------------------------------------------
    def set_limits(self, *, pids_max: int | None = None, memory_pct: int | None = None) -> None:
        """Limits for each command's cgroup in the guest, applied from the next hello on:
        ``pids_max`` tasks per command, ``memory_pct`` percent of the commands' memory."""
        limits = {
            k: v for k, v in (("pids_max", pids_max), ("memory_pct", memory_pct)) if v is not None
        }
        try:
            self.limits = cgroups.check_limits(limits)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

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
                    _checked(frame, "exec")
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
                reply: ExecReply = _convert(frame, ExecReply, "exec")
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
        result: Stat = _convert(frame, Stat, "fs.stat")
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
        started: ProcStarted = _convert(frame, ProcStarted, "proc.start")
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
        info: ProcInfo = _convert(frame, ProcInfo, "proc.wait")
        return info

    async def proc_output(
        self, proc: int, stream: str, offset: int, length: int = P.MAX_PAYLOAD
    ) -> tuple[bytes, ProcOutput]:
        frame = await self.call(
            P.PROC_OUTPUT, {"proc": proc, "stream": stream, "offset": offset, "length": length}
        )
        meta: ProcOutput = _convert(frame, ProcOutput, "proc.output")
        return frame.payload, meta

    async def proc_stdin(self, proc: int, data: bytes, *, eof: bool = False) -> None:
        await self.call(P.PROC_STDIN, {"proc": proc, "eof": eof}, data)

    async def proc_signal(self, proc: int, signal: int) -> ProcInfo:
        frame = await self.call(P.PROC_SIGNAL, {"proc": proc, "signal": signal})
        info: ProcInfo = _convert(frame, ProcInfo, "proc.signal")
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
                _checked(frame, "tcp.open")  # err -> AgentError; a stray ok -> protocol error
                raise AgentProtocolError("tcp.open: the guest ended the relay before starting it")
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return TcpStream(self, rid, q)


class TcpStream:
    """One TCP connection relayed by the guest agent (see ``AgentClient.tcp_open``).

    Reads acknowledge what they consume, so the guest never has more than
    ``TCP_WINDOW`` bytes in flight here; writes wait for the guest to take each chunk.
    """

    def __init__(
        self, client: AgentClient, rid: int, q: asyncio.Queue[P.Frame | BaseException]
    ) -> None:
        self._client = client
        self._rid = rid
        self._q = q
        self._eof = False  # the guest side sent EOF
        self._done = False  # the final ok/err arrived
        self.received = 0
        self.sent = 0

    @property
    def at_eof(self) -> bool:
        return self._eof or self._done

    @property
    def finished(self) -> bool:
        """The guest ended the relay (its final reply came): nothing more will flow."""
        return self._done

    async def read(self) -> bytes:
        """Next chunk from the guest; b"" once the guest side is at EOF (or the relay ended).

        Waits as long as the connection is idle; it is woken if the agent connection fails
        (VMDied / AgentProtocolError) or the relay is closed."""
        while not self.at_eof:
            frame = await self._client._next(self._q, None)
            if frame.type == P.OUT:
                if frame.header.get("stream") != "tcp":
                    raise AgentProtocolError("tcp: output on a stream other than 'tcp'")
                if frame.header.get("eof") is True:
                    self._eof = True
                    break
                data = frame.payload
                if len(data) > P.TCP_CHUNK:
                    raise AgentProtocolError(f"tcp: a chunk larger than {P.TCP_CHUNK} bytes")
                if not data:
                    continue
                self.received += len(data)
                await self._client._send(
                    {"t": P.TCP_ACK, "id": 0, "ref": self._rid, "bytes": len(data)}
                )
                return data
            if frame.type in (P.OK, P.ERR):
                self._finish()
                break
            raise AgentProtocolError(f"tcp: unexpected frame {frame.type!r}")
        return b""

    async def write(self, data: bytes, timeout: float = CALL_TIMEOUT * 3) -> None:
        """Send bytes to the guest socket, in chunks; each waits until the guest wrote it."""
        view = memoryview(data)
        while view:
            chunk = bytes(view[: P.CHUNK])
            await self._client.call(
                P.TCP_DATA, {"ref": self._rid, "eof": False}, chunk, timeout=timeout
            )
            self.sent += len(chunk)
            view = view[len(chunk) :]

    async def write_eof(self) -> None:
        """Half-close: the guest application reads EOF; its replies still come back."""
        await self._client.call(P.TCP_DATA, {"ref": self._rid, "eof": True})

    async def close(self, timeout: float = 5.0) -> None:
        """Abort the relay (if still open) and wait, bounded, for the guest to end it."""
        if self._done:
            return
        try:
            with contextlib.suppress(MvmError):
                await self._client._send({"t": P.TCP_CLOSE, "id": 0, "ref": self._rid})
            deadline = time.monotonic() + timeout
            while not self._done:
                try:
                    frame = await self._client._next(self._q, deadline)
                except MvmError:
                    break
                if frame.type in (P.OK, P.ERR):
                    break
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._client._pending.pop(self._rid, None)


def exec_reply(frame: P.Frame) -> ExecReply:
    """The guest's final exec frame, validated (for callers streaming ``exec_stream``)."""
    reply: ExecReply = _convert(frame, ExecReply, "exec")
    return reply
