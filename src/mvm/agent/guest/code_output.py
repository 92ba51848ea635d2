"""run_code contexts: the connection to the current client and the cell's output
(sys.stdout/sys.stderr, and fds 1 and 2 for child processes), bounded per cell.
Shared by code_server.py and code_bash.py; standard library only."""

from __future__ import annotations

import codecs
import io
import json
import os
import select
import socket
import stat
import threading
import time
from typing import Any

OUTPUT_LIMIT = 4 * 1024 * 1024  # per stream and cell
DISPLAY_LIMIT = 16 * 1024 * 1024  # all rich outputs of one cell
TEXT_LIMIT = 1024 * 1024  # one text/plain, text/html, ... value
FLUSH_SECONDS = 0.05


def socket_dir() -> str:
    return f"/tmp/.mvm-code-{os.getuid()}"


def private_dir(path: str) -> None:
    """Make (or check) a 0700 directory of ours: nobody else may reach our sockets."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit(f"mvm-code: {path} is not a private directory of uid {os.getuid()}")


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "\n...[truncated by mvm]"


class Conn:
    """The current client connection; output is dropped when there is none (or it broke)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.counts = {"stdout": 0, "stderr": 0}
        self.truncated = False
        self.display_bytes = 0

    def attach(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            self.counts = {"stdout": 0, "stderr": 0}
            self.truncated = False
            self.display_bytes = 0

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self.lock:
            if self.sock is None:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.sock = None

    def out(self, stream: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            room = OUTPUT_LIMIT - self.counts[stream]
            if room <= 0:
                self.truncated = True
                return
            if len(text) > room:
                text, self.truncated = text[:room], True
            self.counts[stream] += len(text)
        self.send({"t": "out", "s": stream, "d": text})

    def display(self, bundle: dict[str, str]) -> None:
        size = sum(len(v) for v in bundle.values())
        with self.lock:
            if self.display_bytes + size > DISPLAY_LIMIT:
                self.truncated = True
                return
            self.display_bytes += size
        self.send({"t": "display", "data": bundle})


CONN = Conn()


class Writer(io.TextIOBase):
    """sys.stdout/sys.stderr of the cell: buffered briefly, then sent to the client."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.buf: list[str] = []
        self.size = 0
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self.lock:
            self.buf.append(s)
            self.size += len(s)
            due = self.size >= 8192 or time.monotonic() - self.last >= FLUSH_SECONDS
        if due:
            self.flush()
        return len(s)

    def flush(self) -> None:
        with self.lock:
            text, self.buf, self.size = "".join(self.buf), [], 0
            self.last = time.monotonic()
        CONN.out(self.stream, text)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1 if self.stream == "stdout" else 2


class FdPump:
    """Forward what child processes write to fd 1/2 (a pipe we own) to the client.
    ``drain()`` at the end of a cell takes what is already in the pipe, so a child's
    output is never reported after the cell's end."""

    def __init__(self, fd: int, stream: str) -> None:
        self.fd, self.stream = fd, stream
        self.lock = threading.Lock()
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")
        os.set_blocking(fd, False)

    def run(self) -> None:
        while True:
            select.select([self.fd], [], [], 1.0)
            if not self.drain():
                return

    def drain(self) -> bool:
        """Forward what is readable now; False at end of file."""
        with self.lock:
            while True:
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:
                    return True
                except OSError:
                    return False
                if not data:
                    return False
                CONN.out(self.stream, self.dec.decode(data))


PUMPS: list[FdPump] = []


def drain_fds() -> None:
    for pump in PUMPS:
        pump.drain()


def capture_fds() -> tuple[Writer, Writer]:
    """Point fds 1 and 2 at pipes we forward, and sys.stdout/err at Writers."""
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        pump = FdPump(r, stream)
        PUMPS.append(pump)
        threading.Thread(target=pump.run, daemon=True).start()
    out, err = Writer("stdout"), Writer("stderr")

    def flusher() -> None:
        while True:
            time.sleep(0.1)
            for w in (out, err):
                if w.size:
                    w.flush()

    threading.Thread(target=flusher, daemon=True).start()
    return out, err
