"""One TCP connection relayed by the guest agent (a port forward's guest end), as a
stream over the agent connection with the guest's send window acknowledged as read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from mvm.agent import protocol as P
from mvm.agent.mux import CALL_TIMEOUT, AgentConnection
from mvm.errors import AgentProtocolError, MvmError


class TcpStream:
    """One TCP connection relayed by the guest agent (see ``AgentClient.tcp_open``).

    Reads acknowledge what they consume, so the guest never has more than
    ``TCP_WINDOW`` bytes in flight here; writes wait for the guest to take each chunk.
    """

    def __init__(
        self, client: AgentConnection, rid: int, q: asyncio.Queue[P.Frame | BaseException]
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
