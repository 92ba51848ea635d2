"""run_code contexts: the connection to the current client and the cell's output
(sys.stdout/sys.stderr, and fds 1 and 2 for child processes), bounded per cell.
Shared by code_server.py and code_bash.py; standard library only."""

from __future__ import annotations

import codecs
import io
import json
import os
import select
import stat
import threading
import time
from typing import Any

OUTPUT_LIMIT = 4 * 1024 * 1024  # per stream and cell
DISPLAY_LIMIT = 16 * 1024 * 1024  # all rich outputs of one cell
TEXT_LIMIT = 1024 * 1024  # one text/plain, text/html, ... value
FLUSH_SECONDS = 0.05
MAX_REQUEST = 2 * 1024 * 1024  # the header line and the cell (the host allows 512 KiB)
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
_syscall: Any = None


def state_dir() -> str:
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


def getfd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2): a copy of another process's fd. Not an open through /proc: the
    exec's pipes were made by root (the agent), so opening them as this user is refused,
    while taking a copy needs only ptrace rights over our own uid's process."""
    global _syscall
    if _syscall is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _syscall = libc.syscall
    got = int(_syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    if got < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return got


class Client:
    """One cell's caller: an exec of code_client.sh of our uid. We take copies of its
    stdin (the header line and the cell), stdout and stderr, write the cell's output and
    the result to the latter, and say ``ack`` then ``done`` on its fd 3 (a pipe it waits
    on). Raises OSError if it is gone or is not such a client."""

    def __init__(self, pid: int, fifo: os.stat_result) -> None:
        self.pid = pid
        base = f"/proc/{pid}"
        if os.stat(base).st_uid != os.getuid():
            raise PermissionError(f"pid {pid} is not ours")
        self.pidfd = os.pidfd_open(pid)
        self.fds: list[int] = []
        try:
            self.wake = self._open(f"{base}/fd/3", fifo)
            try:
                os.close(getfd(self.pidfd, 0))  # a denied copy (no ptrace rights) fails here
            except OSError:
                os.write(self.wake, b"nofd\n")
                raise
            os.write(self.wake, b"ack\n")
            # It wrote its request with fd 1 pointed at the request FIFO for a moment:
            # once it has read the ack fd 1 is its own again; never take the FIFO.
            for _ in range(400):
                out = self._take(1, fifo)
                if out >= 0:
                    break
                time.sleep(0.005)
            else:
                raise OSError("the client's stdout stayed its request FIFO")
            self.out = out
            self.err = self._take(2, fifo, strict=True)
            stdin = self._take(0, fifo, strict=True)
            self.stdin = self._read_stdin(stdin)
        except BaseException:
            self.close()
            raise

    def _open(self, path: str, fifo: os.stat_result) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return self._keep(fd, fifo, True)

    def _take(self, num: int, fifo: os.stat_result, strict: bool = False) -> int:
        return self._keep(getfd(self.pidfd, num), fifo, strict)

    def _keep(self, fd: int, fifo: os.stat_result, strict: bool) -> int:
        """Keep ``fd`` if it is a pipe other than the request FIFO (else -1, or OSError
        if ``strict``)."""
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or (st.st_dev, st.st_ino) == (fifo.st_dev, fifo.st_ino):
            os.close(fd)
            if strict:
                raise OSError("not the client's pipe")
            return -1
        self.fds.append(fd)
        return fd

    def _read_stdin(self, fd: int) -> bytes:
        os.set_blocking(fd, False)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + 30
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or size > MAX_REQUEST:
                raise OSError("the client's stdin did not end")
            select.select([fd], [], [], left)
            try:
                data = os.read(fd, 262144)
            except BlockingIOError:
                continue
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            size += len(data)

    def release_output(self) -> None:
        """Close our copies of its stdout/stderr, so the exec's pipes can reach EOF
        (detach it from CONN first: nobody may be writing to them)."""
        for fd in (self.out, self.err):
            if fd in self.fds:
                self.fds.remove(fd)
                os.close(fd)

    def done(self) -> None:
        """Close its stdout/stderr (the exec's pipes reach EOF), then let it exit."""
        self.release_output()
        try:
            os.write(self.wake, b"done\n")
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        for fd in (*self.fds, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class Conn:
    """The current cell's output; dropped when there is no client (or it went away)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Client | None = None
        self.counts = {"stdout": 0, "stderr": 0}
        self.truncated = False
        self.display_bytes = 0
        self.outputs: list[dict[str, str]] = []

    def attach(self, client: Client | None) -> None:
        with self.lock:
            self.client = client
            self.counts = {"stdout": 0, "stderr": 0}
            self.truncated = False
            self.display_bytes = 0
            self.outputs = []

    def _write(self, stream: str, data: bytes) -> None:
        with self.lock:
            c = self.client
            if c is None:
                return
            fd = c.out if stream == "stdout" else c.err
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                self.client = None  # it went away: the cell's output is nobody's

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
        self._write(stream, text.encode("utf-8", "replace"))

    def display(self, bundle: dict[str, str]) -> None:
        size = sum(len(v) for v in bundle.values())
        with self.lock:
            if self.display_bytes + size > DISPLAY_LIMIT:
                self.truncated = True
                return
            self.display_bytes += size
            self.outputs.append(bundle)

    def record(self, nonce: str, msg: dict[str, Any]) -> None:
        """The result, last on stdout behind the marker (code_client.sh's form)."""
        with self.lock:
            msg = {**msg, "outputs": self.outputs, "truncated": self.truncated}
        body = json.dumps(msg, ensure_ascii=False)
        self._write("stdout", f"\x1eMVMCODE:{nonce}\n{body}\n".encode("utf-8", "replace"))


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
        drain_fds()  # what a child process wrote before this text goes first
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
