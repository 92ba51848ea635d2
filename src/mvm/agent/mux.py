"""One connection to the guest agent, multiplexed: requests by id, frames to their
request's bounded queue (backpressure onto the guest), events to a callback.

The guest is untrusted: the decoder is strict (any framing violation fails the
connection as AgentProtocolError), frames nobody asked for are dropped and counted,
and a failed connection fails every request waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from mvm.agent import protocol as P
from mvm.agent.replies import checked
from mvm.errors import AgentProtocolError, CommandTimeout, VMDied

#: Frames a request may have waiting before the reader stops reading (backpressure).
QUEUE_FRAMES = 16
#: Default timeout for small requests (fs, ping).
CALL_TIMEOUT = 30.0


class AgentConnection:
    """The transport under ``AgentClient``: send, wait for the next frame, call."""

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
        #: Called (synchronously, must not block) with each unsolicited event frame.
        self.on_event: Callable[[P.Frame], None] | None = None

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> Self:
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
                    return checked(frame, type_)
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
