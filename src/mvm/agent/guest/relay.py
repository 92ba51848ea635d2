"""TCP relays for port forwards (tcp.*): the guest end of one host connection, a socket to
127.0.0.1:port whose bytes travel to the host within the window the host acknowledges.

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent import protocol as P
    from mvm.agent.guest.base import AgentBase, Channel, RequestError, want_bool, want_int
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    import protocol as P
    from base import AgentBase, Channel, RequestError, want_bool, want_int

TCP_CONNECT_TIMEOUT = 10.0  # seconds for a relay's connect to 127.0.0.1:port
TCP_WRITE_TIMEOUT = 60.0  # seconds a guest application may leave relayed bytes unread


class TcpConn:
    """One relayed TCP connection (tcp.open): the guest-side socket and its send window."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cond = threading.Condition()
        self.unacked = 0  # bytes sent to the host and not yet acknowledged
        self.received = 0  # bytes the host wrote into the socket
        self.host_eof = False
        self.aborted = False

    def abort(self) -> None:
        """End the relay now; shutdown (not close) wakes a recv blocked in another thread."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class TcpHandlers(AgentBase):
    """tcp.open, data, ack and close, by the id of the tcp.open request."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.tcp: dict[int, TcpConn] = {}
        self.tcp_lock = threading.Lock()

    def drop_relays(self) -> None:
        """End every relay: they belong to a host connection that is gone."""
        with self.tcp_lock:
            stale = list(self.tcp.values())
        for conn in stale:
            conn.abort()

    def tcp_open(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Connect to 127.0.0.1:port and pump guest->host bytes within the host's window."""
        port = want_int(h, "port", 0, 1, 65535)
        with self.tcp_lock:
            if len(self.tcp) >= P.MAX_TCP:
                raise RequestError(P.E_INTERNAL, f"too many TCP relays ({len(self.tcp)})")
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TCP_CONNECT_TIMEOUT)
        except ConnectionRefusedError:
            raise RequestError(
                P.E_REFUSED, f"nothing listens on 127.0.0.1:{port} in the guest"
            ) from None
        except OSError as exc:
            raise RequestError(P.E_INTERNAL, f"connect to 127.0.0.1:{port}: {exc}") from None
        sock.settimeout(None)
        conn = TcpConn(sock)
        with self.tcp_lock:
            self.tcp[rid] = conn
        sent = 0
        try:
            self.ch.send({"t": P.STARTED, "id": rid, "port": port})
            while True:
                with conn.cond:
                    while conn.unacked >= P.TCP_WINDOW and not conn.aborted:
                        conn.cond.wait(1.0)
                    if conn.aborted:
                        break
                    room = P.TCP_WINDOW - conn.unacked
                try:
                    data = sock.recv(min(P.TCP_CHUNK, room))
                except OSError:
                    break
                if conn.aborted:
                    break
                if not data:
                    self.ch.send({"t": P.OUT, "id": rid, "stream": "tcp", "eof": True})
                    with conn.cond:
                        while not (conn.host_eof or conn.aborted):
                            conn.cond.wait(1.0)
                    break
                with conn.cond:
                    conn.unacked += len(data)
                sent += len(data)
                self.ch.send({"t": P.OUT, "id": rid, "stream": "tcp"}, data)
        finally:
            with self.tcp_lock:
                self.tcp.pop(rid, None)
            try:
                sock.close()
            except OSError:
                pass
        return {"sent": sent, "received": conn.received}, b""

    def _tcp(self, h: dict[str, Any]) -> TcpConn | None:
        ref = h.get("ref")
        with self.tcp_lock:
            return self.tcp.get(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None

    def tcp_data(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Write host bytes into the guest socket (bounded wait), then maybe half-close it."""
        conn = self._tcp(h)
        if conn is None:
            raise RequestError(P.E_UNKNOWN_REF, f"no TCP relay with id {h.get('ref')!r}")
        eof = want_bool(h, "eof", False)
        view = memoryview(payload)
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLOUT)
        deadline = time.monotonic() + TCP_WRITE_TIMEOUT
        while view:
            if conn.aborted:
                raise RequestError(P.E_UNKNOWN_REF, "the TCP relay was closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(P.E_INTERNAL, "the guest application did not read its input")
            if not poller.poll(int(min(left, 1.0) * 1000) + 1):
                continue
            try:
                n = conn.sock.send(view, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise RequestError(P.E_INTERNAL, f"write to the guest socket: {exc}") from None
            view = view[n:]
        conn.received += len(payload)
        if eof:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with conn.cond:
                conn.host_eof = True
                conn.cond.notify_all()
        return {}, b""

    def tcp_ack(self, rid: int, h: dict[str, Any], payload: bytes) -> None:
        conn = self._tcp(h)
        n = want_int(h, "bytes", 0, 0, 1 << 40)
        if conn is not None:
            with conn.cond:
                conn.unacked = max(0, conn.unacked - n)
                conn.cond.notify_all()
        return None

    def tcp_close(self, rid: int, h: dict[str, Any], payload: bytes) -> None:
        conn = self._tcp(h)
        if conn is not None:
            conn.abort()
        return None
