"""mvm guest agent: runs inside the VM as PID 1 and serves the host over virtio-serial.

Only the guest's Python standard library is used. The initramfs copies this
file and ``protocol.py`` to ``/run/mvm/`` and execs ``python3 -I agent.py``,
so a user's image can neither replace nor shadow the agent.

As PID 1 the process forks: the parent only reaps orphans (and restarts the
agent if it ever dies); the child serves requests. Every request is handled
in its own thread; frames are written whole under one lock, looping on
partial writes (virtio-serial writes are often partial).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mvm.agent import protocol as P
    from mvm.agent.guest import cgroups as CG
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import protocol as P  # in the guest: copied beside this file
    except ImportError:  # on the host (tests): the same module from the package
        from mvm.agent import protocol as P
    import cgroups as CG  # beside this file, in the guest and in the package alike

PORT_NAME = "org.mvm.agent"
DEFAULT_USER = "user"
MAX_THREADS = 256
MAX_LIST_ENTRIES = 10000
DRAIN_AFTER_EXIT = 1.0  # seconds pipes may stay open after the command exited
DRAIN_CONTAINED = 30.0  # bound on sending what a killed command group left in its pipes
TCP_CONNECT_TIMEOUT = 10.0  # seconds for a relay's connect to 127.0.0.1:port
TCP_WRITE_TIMEOUT = 60.0  # seconds a guest application may leave relayed bytes unread
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"mvm-agent: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


ERRNO_CODES = {
    errno.ENOENT: P.E_NOT_FOUND,
    errno.EEXIST: P.E_EXISTS,
    errno.EACCES: P.E_PERMISSION,
    errno.EPERM: P.E_PERMISSION,
    errno.EROFS: P.E_PERMISSION,
    errno.EISDIR: P.E_IS_DIR,
    errno.ENOTDIR: P.E_NOT_DIR,
    errno.ENOTEMPTY: P.E_NOT_EMPTY,
    errno.ENOSPC: P.E_NO_SPACE,
    errno.EDQUOT: P.E_NO_SPACE,
    errno.EFBIG: P.E_TOO_LARGE,
}


def os_error(exc: OSError, path: str) -> RequestError:
    code = ERRNO_CODES.get(exc.errno or 0, P.E_INTERNAL)
    return RequestError(code, f"{path}: {exc.strerror or exc}")


# --------------------------------------------------------------------------- channel


class Channel:
    """The virtio-serial port: whole-frame writes under a lock, lenient reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = memoryview(P.encode(header, payload))
        with self.lock:
            while data:
                try:
                    n = os.write(self.fd, data)
                except InterruptedError:
                    continue
                data = data[n:]


def find_port(timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    base = "/sys/class/virtio-ports"
    while True:
        try:
            for entry in sorted(os.listdir(base)):
                try:
                    with open(os.path.join(base, entry, "name")) as f:
                        if f.read().strip() == PORT_NAME:
                            dev = "/dev/" + entry
                            if os.path.exists(dev):
                                return dev
                except OSError:
                    continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio port {PORT_NAME} not found")
        time.sleep(0.02)


# --------------------------------------------------------------------------- helpers


def want_str(h: dict[str, Any], key: str, default: str | None = None) -> str:
    v = h.get(key, default)
    if not isinstance(v, str):
        raise RequestError(P.E_BAD_REQUEST, f"'{key}' must be a string")
    if "\x00" in v:
        raise RequestError(P.E_BAD_REQUEST, f"'{key}' contains a NUL byte")
    return v


def want_int(h: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = h.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RequestError(P.E_BAD_REQUEST, f"'{key}' must be an integer in [{lo}, {hi}]")
    return v


def want_bool(h: dict[str, Any], key: str, default: bool = False) -> bool:
    v = h.get(key, default)
    if not isinstance(v, bool):
        raise RequestError(P.E_BAD_REQUEST, f"'{key}' must be a boolean")
    return v


def want_path(h: dict[str, Any], key: str = "path") -> str:
    p = want_str(h, key)
    if not p.startswith("/"):
        raise RequestError(P.E_BAD_REQUEST, f"'{key}' must be an absolute path")
    return p


def with_spec(h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """A command too large for the header comes at the head of the payload (``"spec": N``,
    see protocol.MAX_SPEC): merge its argv/env/cwd into the header, return the rest (stdin)."""
    if "spec" not in h:
        return h, payload
    n = want_int(h, "spec", 0, 0, P.MAX_SPEC)
    if n > len(payload):
        raise RequestError(P.E_BAD_REQUEST, "'spec' is longer than the payload")
    try:
        spec = json.loads(payload[:n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        spec = None
    if not isinstance(spec, dict) or not set(spec) <= {"argv", "env", "cwd"}:
        raise RequestError(P.E_BAD_REQUEST, "'spec' must be a JSON object of argv, env, cwd")
    return {**h, **spec}, payload[n:]


def resolve_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RequestError(P.E_BAD_REQUEST, f"unknown user '{name}' in the guest") from None


def owner_ids(h: dict[str, Any]) -> tuple[int, int] | None:
    name = want_str(h, "owner", DEFAULT_USER)
    if name == "root":
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def stat_dict(st: os.stat_result) -> dict[str, Any]:
    return {
        "type": kind_of(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


# --------------------------------------------------------------------------- processes


class SpawnError(Exception):
    """The command could not be started: 127 (not found) or 126 (cannot execute)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def spawn(h: dict[str, Any], group: CG.Group | None = None) -> subprocess.Popen[bytes]:
    """Start the command a request describes (argv, env, cwd, user), with pipes, in a
    new session and (given one) in ``group``'s cgroup before it runs a single instruction
    of its own. Raises RequestError for a bad request, SpawnError if it cannot run."""
    argv = h.get("argv")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\x00" not in a for a in argv)
    ):
        raise RequestError(P.E_BAD_REQUEST, "'argv' must be a non-empty list of strings")
    pw = resolve_user(want_str(h, "user", DEFAULT_USER))
    env_in = h.get("env", {})
    if not isinstance(env_in, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\x00" not in k + v
        for k, v in env_in.items()
    ):
        raise RequestError(P.E_BAD_REQUEST, "'env' must map names to strings")
    env = {
        "PATH": PATH,
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "LANG": "C.UTF-8",
    }
    env.update(env_in)
    cwd = h.get("cwd")
    if cwd is None:
        cwd = "/work" if os.path.isdir("/work") else pw.pw_dir
    elif not isinstance(cwd, str) or "\x00" in cwd:
        raise RequestError(P.E_BAD_REQUEST, "'cwd' must be a string")
    if not os.path.isdir(cwd):
        raise RequestError(P.E_NOT_FOUND, f"working directory {cwd} does not exist")
    other = pw.pw_uid != os.getuid()
    gated = group is not None and group.path is not None
    cmd = argv
    if gated:
        check_runnable(argv[0], env["PATH"], cwd)
        cmd = ["/bin/sh", "-c", GATE, argv[0], *argv]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            user=pw.pw_uid if other else None,
            group=pw.pw_gid if other else None,
            extra_groups=[] if other else None,
            start_new_session=True,
            close_fds=True,
        )
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SpawnError(127, f"command not found: {argv[0]}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise SpawnError(126, f"cannot execute: {argv[0]}: {exc.strerror or exc}") from None
    # Still behind the gate (gated) or already running (not): OOM-killable again (the
    # agent's -1000 is inherited), into its cgroup, then through the gate.
    set_oom_score(proc.pid, 0)
    try:
        if group is not None:
            try:
                group.add(proc.pid)
            except OSError as exc:
                log(f"cannot move a command into its cgroup (process-group kill only): {exc}")
                group.path = None
    finally:
        if gated and proc.stdin is not None:
            try:  # the gate's line, before any of the command's own stdin
                os.write(proc.stdin.fileno(), b"\n")
            except OSError:
                pass
    return proc


#: ioctl RNDRESEEDCRNG (_IO('R', 0x07)): reseed the kernel's CRNG from its input pool now.
RNDRESEEDCRNG = 0x5207


def reseed_rng(seed_hex: str) -> None:
    """Mix the host's seed into the kernel's input pool, then reseed the CRNG at once.
    Clones of one template resume with the same CRNG state, and since Linux 5.18 a write
    to /dev/urandom only reaches the CRNG at its next timed reseed (up to a minute
    away): without the ioctl two clones read the same /dev/urandom bytes meanwhile."""
    try:
        data = bytes.fromhex(seed_hex)
    except ValueError:
        return
    try:
        with open("/dev/urandom", "wb", buffering=0) as f:
            f.write(data)
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
    except OSError as exc:
        log(f"cannot reseed the guest RNG: {exc}")


#: The gate a command waits behind (``sh -c GATE argv0 argv...``): until the agent has
#: moved it into its cgroup and writes one line to its stdin (``read`` takes a pipe byte
#: by byte, so nothing after the line is consumed); then the command replaces the shell
#: (same pid, session, cgroup), so nothing it forks is outside.
GATE = 'read -r _; exec "$@"'


def check_runnable(prog: str, path: str, cwd: str) -> None:
    """SpawnError (127 not found, 126 not executable) before a gated start, as a direct
    exec would have said: behind the gate, the shell would report it in its own words."""
    if "/" in prog:
        full = os.path.join(cwd, prog)
        if not os.path.exists(full):
            raise SpawnError(127, f"command not found: {prog}")
        if os.path.isdir(full) or not os.access(full, os.X_OK):
            raise SpawnError(126, f"cannot execute: {prog}: Permission denied")
    else:
        found = shutil.which(prog, path=path)
        if found is None:
            raise SpawnError(127, f"command not found: {prog}")
        full = found
    # execve refuses (ENOEXEC) what is neither a script nor an ELF binary, but the gate's
    # shell would run it as a shell script: refuse it here as execve would.
    try:
        if not stat.S_ISREG(os.stat(full).st_mode):  # a FIFO would block the open below
            raise SpawnError(126, f"cannot execute: {prog}: Permission denied")
        with open(full, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # unreadable but executable: let the exec itself decide
    if not (head.startswith(b"#!") or head == b"\x7fELF"):
        raise SpawnError(126, f"cannot execute: {prog}: Exec format error")


def pipe_chunks(f: Any, stop: threading.Event) -> Iterator[bytes]:
    """Yield what a command's pipe gives until EOF or ``stop``, then close the pipe.

    The reader closes the pipe itself, never another thread: a pipe kept open by a
    lingering background child would otherwise be closed under a reader still blocked
    on it, its fd number reused by the next command's pipe, and that output stolen.
    """
    try:
        fd = f.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not stop.is_set():
            if not poller.poll(200):
                continue
            try:
                chunk = os.read(fd, P.CHUNK)
            except OSError:
                return
            if not chunk:
                return
            yield chunk
    finally:
        try:
            f.close()
        except OSError:
            pass


def set_oom_score(pid: int | str, score: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError:
        pass


class Ring:
    """The last ``cap`` bytes of a stream, addressed by absolute offsets."""

    def __init__(self, cap: int = P.PROC_RING) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.start = 0  # absolute offset of buf[0]

    @property
    def end(self) -> int:
        return self.start + len(self.buf)

    def append(self, data: bytes) -> None:
        self.buf += data
        extra = len(self.buf) - self.cap
        if extra > 0:
            del self.buf[:extra]
            self.start += extra

    def read(self, offset: int, length: int) -> tuple[bytes, int, int]:
        """(data, offset it starts at, bytes lost before it because the ring wrapped)."""
        lost = max(0, self.start - offset)
        offset = max(offset, self.start)
        i = offset - self.start
        return bytes(self.buf[i : i + length]), offset, lost


def short_argv(argv: list[str], budget: int = 16 * 1024) -> list[str]:
    """A command line to show in replies and events: at most 64 arguments of at most 256
    characters, 16 KiB of JSON in all (a command may carry up to protocol.MAX_SPEC; a
    header only 64 KiB)."""
    out = []
    for a in argv[:64]:
        a = a if len(a) <= 256 else a[:253] + "..."
        budget -= len(json.dumps(a))
        if budget < 0:
            break
        out.append(a)
    return out


class Background:
    """A process started with proc.start: its output is kept in rings in the guest."""

    def __init__(
        self, num: int, proc: subprocess.Popen[bytes], argv: list[str], group: CG.Group
    ) -> None:
        self.num = num
        self.proc = proc
        self.group = group  # its own cgroup: not killed when an exec ends
        self.argv = argv
        self.started = time.time()
        self.ended: float | None = None
        self.rings = {"stdout": Ring(), "stderr": Ring()}
        self.cond = threading.Condition()
        self.pumps_done = 0
        self.stop = threading.Event()  # set after exit + drain: pumps close their pipes

    def info(self) -> dict[str, Any]:
        rc = self.proc.returncode
        return {
            "proc": self.num,
            "pid": self.proc.pid,
            "argv": short_argv(self.argv),
            "running": self.ended is None,
            "exit_code": None if rc is None else (rc if rc >= 0 else 128 - rc),
            "signal": -rc if rc is not None and rc < 0 else None,
            "started": self.started,
            "ended": self.ended,
            "stdout_bytes": self.rings["stdout"].end,
            "stderr_bytes": self.rings["stderr"].end,
        }


class EventQueue:
    """Events for the host, sent by one thread so producers never block on the channel
    (writes block while no host is connected). Bounded in bytes; the oldest output
    events go first (the host can re-read output from the rings)."""

    def __init__(self, channel: Channel, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.ch = channel
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def put(self, header: dict[str, Any], payload: bytes = b"") -> None:
        with self.cond:
            self.items.append(({"t": P.EVENT, "id": 0, **header}, payload))
            self.bytes += len(payload)
            while self.bytes > self.max_bytes and self.items:
                _, dropped = self.items.popleft()
                self.bytes -= len(dropped)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                header, payload = self.items.popleft()
                self.bytes -= len(payload)
            try:
                self.ch.send(header, payload)
            except OSError as exc:
                log(f"event send failed: {exc}")


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


# --------------------------------------------------------------------------- agent


class Agent:
    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.procs_lock = threading.Lock()
        self.threads = threading.BoundedSemaphore(MAX_THREADS)
        self.bg: dict[int, Background] = {}
        self.bg_lock = threading.Lock()
        self.bg_next = 1
        self.events = EventQueue(channel)
        self.tcp: dict[int, TcpConn] = {}
        self.tcp_lock = threading.Lock()
        self.session: str | None = None  # the host connection that owns the TCP relays
        self.cg = CG.Cgroups()  # set up by serve_forever; until then process groups only
        self.groups: dict[int, CG.Group] = {}  # exec id -> its group (under procs_lock)

    def new_group(self, kind: str) -> CG.Group:
        """A cgroup for one command, or a process-group-only one if that cannot be made."""
        try:
            return self.cg.group(kind)
        except OSError as exc:
            log(f"no cgroup for a {kind} (process-group kill only): {exc}")
            return CG.Group(None)

    # -- dispatch ---------------------------------------------------------------
    def serve(self) -> None:
        decoder = P.FrameDecoder(strict=False)
        buf = bytearray(P.CHUNK)
        view = memoryview(buf)
        self.ch.send({"t": P.READY, "id": 0, "version": P.PROTOCOL_VERSION})
        while True:
            try:
                n = os.readv(self.ch.fd, [buf])
            except InterruptedError:
                continue
            if n == 0:  # host side not connected: drop any partial frame, wait
                decoder.reset()
                time.sleep(0.05)
                continue
            for frame in decoder.feed(view[:n]):
                self.dispatch(frame)

    def dispatch(self, frame: P.Frame) -> None:
        t, rid = frame.type, frame.id
        if t in (P.STDIN, P.SIGNAL, P.PING, P.HELLO, P.TCP_ACK, P.TCP_CLOSE):
            self.handle(frame)  # cheap and order-sensitive: inline
            return
        if t not in P.REQUESTS:
            self.reply_err(rid, P.E_BAD_REQUEST, f"unknown request type {t!r}")
            return
        if not self.threads.acquire(blocking=False):
            self.reply_err(rid, P.E_INTERNAL, "agent busy: too many requests in flight")
            return
        th = threading.Thread(target=self._run, args=(frame,), daemon=True)
        th.start()

    def _run(self, frame: P.Frame) -> None:
        try:
            self.handle(frame)
        finally:
            self.threads.release()

    def handle(self, frame: P.Frame) -> None:
        rid = frame.id
        try:
            method = HANDLERS.get(frame.type)
            if method is None:
                raise RequestError(P.E_BAD_REQUEST, f"unknown request type {frame.type!r}")
            result = method(self, rid, frame.header, frame.payload)
            if result is not None:
                header, payload = result
                header.update({"t": P.OK, "id": rid})
                self.ch.send(header, payload)
        except RequestError as exc:
            self.reply_err(rid, exc.code, exc.message)
        except OSError as exc:
            self.reply_err(rid, P.E_INTERNAL, f"{exc.__class__.__name__}: {exc}")
        except Exception as exc:  # never let one request kill the agent
            self.reply_err(rid, P.E_INTERNAL, f"{exc.__class__.__name__}: {exc}")

    def reply_err(self, rid: int, code: str, message: str) -> None:
        self.ch.send({"t": P.ERR, "id": max(rid, 0), "code": code, "message": message[:4000]})

    # -- basic ------------------------------------------------------------------
    def hello(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        now = h.get("time")
        if isinstance(now, (int, float)) and not isinstance(now, bool) and now > 1e9:
            try:
                time.clock_settime(time.CLOCK_REALTIME, float(now))
            except OSError:
                pass
        seed = h.get("seed")
        if isinstance(seed, str) and len(seed) <= 1024:
            reseed_rng(seed)
        session = h.get("session")
        if isinstance(session, str) and session != self.session:
            if self.session is not None:  # a new host: relays of the old one have no peer
                with self.tcp_lock:
                    stale = list(self.tcp.values())
                for conn in stale:
                    conn.abort()
            self.session = session
        limits = h.get("limits")
        if limits is not None:
            try:
                self.cg.configure(CG.check_limits(limits))
            except ValueError as exc:
                raise RequestError(P.E_BAD_REQUEST, str(exc)) from None
        nonce = h.get("nonce", "")
        return {
            "version": P.PROTOCOL_VERSION,
            "nonce": nonce if isinstance(nonce, str) else "",
            "python": sys.version.split()[0],
            "kernel": os.uname().release,
            "cgroup": self.cg.describe(),
        }, b""

    def ping(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, b""

    def shutdown(self, rid: int, h: dict[str, Any], payload: bytes) -> None:
        self.ch.send({"t": P.OK, "id": rid})
        os.sync()
        try:
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("o")
        except OSError as exc:
            log(f"poweroff failed: {exc}")
        return None

    # -- exec -------------------------------------------------------------------
    def exec_(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        timeout = h.get("timeout")
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0
        ):
            raise RequestError(P.E_BAD_REQUEST, "'timeout' must be a positive number")
        limit = want_int(h, "output_limit", P.DEFAULT_OUTPUT_LIMIT, 0, 1 << 40)
        h, payload = with_spec(h, payload)
        keep_stdin = want_bool(h, "stdin_open", False)
        detach = want_bool(h, "detach", False)
        started = time.monotonic()
        group = self.new_group("exec")
        try:
            proc = spawn(h, group)
        except RequestError:
            self.cg.release(group, kill=False)
            raise
        except SpawnError as exc:
            self.cg.release(group, kill=False)
            msg = f"mvm: {exc.message}\n".encode()
            self.ch.send({"t": P.OUT, "id": rid, "stream": "stderr"}, msg)
            return {
                "exit_code": exc.exit_code,
                "signal": None,
                "timed_out": False,
                "truncated": {"stdout": False, "stderr": False},
                "stdout_bytes": 0,
                "stderr_bytes": len(msg),
                "duration": time.monotonic() - started,
            }, b""
        self.ch.send({"t": P.STARTED, "id": rid, "pid": proc.pid})
        with self.procs_lock:
            self.procs[rid] = proc
            self.groups[rid] = group
        counts = {"stdout": 0, "stderr": 0}
        truncated = {"stdout": False, "stderr": False}

        stop = threading.Event()

        def pump(stream: str, f: Any) -> None:
            for chunk in pipe_chunks(f, stop):
                room = limit - counts[stream]
                if room <= 0:
                    truncated[stream] = True
                    continue  # keep draining so the command never blocks
                if len(chunk) > room:
                    chunk = chunk[:room]
                    truncated[stream] = True
                counts[stream] += len(chunk)
                self.ch.send({"t": P.OUT, "id": rid, "stream": stream}, chunk)

        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        pumps = [
            threading.Thread(target=pump, args=("stdout", proc.stdout), daemon=True),
            threading.Thread(target=pump, args=("stderr", proc.stderr), daemon=True),
        ]
        for th in pumps:
            th.start()
        stdin_thread = threading.Thread(
            target=self._feed_stdin, args=(proc, payload, not keep_stdin), daemon=True
        )
        stdin_thread.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            group.kill()
            try:  # among a thousand dying forks it may take a while to be reaped: answer
                proc.wait(timeout=DRAIN_AFTER_EXIT)  # first, reap below in the background
            except subprocess.TimeoutExpired:
                pass
        if not detach:
            group.kill()  # what the command left behind ends with it (its pipes close)
        # Once the whole group is killed nothing can hold the pipes open, so the pumps end
        # at EOF: give them time to send what is still buffered (under load a pump waits
        # on the channel's backpressure; a 1 s cut lost the tail of stderr). A detached or
        # uncontained command may leave a child holding them: then only the short wait.
        contained = group.path is not None and not detach
        deadline = time.monotonic() + (DRAIN_CONTAINED if contained else DRAIN_AFTER_EXIT)
        for th in pumps:
            th.join(max(0.0, deadline - time.monotonic()))
        stop.set()  # pumps still held open by a lingering child stop and close their pipes
        with self.procs_lock:
            self.procs.pop(rid, None)
            self.groups.pop(rid, None)

        def finish() -> None:  # the answer does not wait for the killed to be gone
            proc.wait()
            self.cg.release(group, kill=not detach)

        threading.Thread(target=finish, daemon=True).start()
        try:
            proc.stdin.close()
        except OSError:
            pass
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        return {
            "exit_code": rc if rc >= 0 else 128 - rc,
            "signal": -rc if rc < 0 else None,
            "timed_out": timed_out,
            "truncated": dict(truncated),
            "stdout_bytes": counts["stdout"],
            "stderr_bytes": counts["stderr"],
            "duration": time.monotonic() - started,
            "contained": group.path is not None,
        }, b""

    @staticmethod
    def _feed_stdin(proc: subprocess.Popen[bytes], data: bytes, close: bool) -> None:
        assert proc.stdin is not None
        try:
            if data:
                proc.stdin.write(data)
                proc.stdin.flush()
            if close:
                proc.stdin.close()
        except (OSError, ValueError):
            pass

    def _proc(self, h: dict[str, Any]) -> subprocess.Popen[bytes]:
        ref = h.get("ref")
        with self.procs_lock:
            proc = self.procs.get(ref) if isinstance(ref, int) else None
        if proc is None:
            raise RequestError(P.E_UNKNOWN_REF, f"no running command with id {ref!r}")
        return proc

    def stdin(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        proc = self._proc(h)
        eof = want_bool(h, "eof", False)
        th = threading.Thread(target=self._feed_stdin, args=(proc, payload, eof), daemon=True)
        th.start()
        return {}, b""

    def signal_(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        proc = self._proc(h)
        sig = want_int(h, "signal", signal.SIGTERM, 1, 64)
        group = want_bool(h, "group", True)
        with self.procs_lock:
            cgroup = self.groups.get(h["ref"])
        if group and sig == signal.SIGKILL and cgroup is not None:
            cgroup.kill()  # the whole cgroup: forks racing the kill included
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        return {}, b""

    # -- background processes -----------------------------------------------------
    def proc_start(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        h, payload = with_spec(h, payload)
        keep_stdin = want_bool(h, "stdin_open", False)
        with self.bg_lock:
            running = sum(1 for b in self.bg.values() if b.ended is None)
            if running >= P.MAX_PROCS:
                raise RequestError(P.E_INTERNAL, f"too many background processes ({running})")
        group = self.new_group("proc")
        try:
            proc = spawn(h, group)
        except RequestError:
            self.cg.release(group, kill=False)
            raise
        except SpawnError as exc:
            self.cg.release(group, kill=False)
            code = P.E_NOT_FOUND if exc.exit_code == 127 else P.E_PERMISSION
            raise RequestError(code, exc.message) from None
        argv = [str(a) for a in h.get("argv", [])]
        with self.bg_lock:
            num = self.bg_next
            self.bg_next += 1
            bg = Background(num, proc, argv, group)
            self.bg[num] = bg
            finished = sorted(
                (b for b in self.bg.values() if b.ended is not None), key=lambda b: b.num
            )
            for old in finished[: max(0, len(self.bg) - P.MAX_PROCS)]:
                del self.bg[old.num]
        assert proc.stdout is not None and proc.stderr is not None
        for stream, f in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            threading.Thread(target=self._bg_pump, args=(bg, stream, f), daemon=True).start()
        threading.Thread(target=self._bg_wait, args=(bg,), daemon=True).start()
        threading.Thread(
            target=self._feed_stdin, args=(proc, payload, not keep_stdin), daemon=True
        ).start()
        return {"proc": num, "pid": proc.pid}, b""

    def _bg_pump(self, bg: Background, stream: str, f: Any) -> None:
        for chunk in pipe_chunks(f, bg.stop):
            with bg.cond:
                offset = bg.rings[stream].end
                bg.rings[stream].append(chunk)
            self.events.put(
                {"kind": "proc.output", "proc": bg.num, "stream": stream, "offset": offset}, chunk
            )
        with bg.cond:
            bg.pumps_done += 1
            bg.cond.notify_all()

    def _bg_wait(self, bg: Background) -> None:
        bg.proc.wait()
        with bg.cond:  # give the pipes a moment to drain so output precedes the exit event
            bg.cond.wait_for(lambda: bg.pumps_done >= 2, timeout=DRAIN_AFTER_EXIT)
            bg.ended = time.time()
            bg.cond.notify_all()
        bg.stop.set()
        self.cg.release(bg.group, kill=False)  # its children may run on; removed once empty
        try:
            if bg.proc.stdin is not None:
                bg.proc.stdin.close()
        except OSError:
            pass
        self.events.put({"kind": "proc.exit", **bg.info()})

    def _bg(self, h: dict[str, Any]) -> Background:
        num = h.get("proc")
        with self.bg_lock:
            bg = self.bg.get(num) if isinstance(num, int) and not isinstance(num, bool) else None
        if bg is None:
            raise RequestError(P.E_UNKNOWN_REF, f"no background process {num!r}")
        return bg

    def proc_list(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        with self.bg_lock:
            procs = [b.info() for b in sorted(self.bg.values(), key=lambda b: b.num)]
        return {"procs": procs}, b""

    def proc_wait(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        bg = self._bg(h)
        timeout = h.get("timeout", 0)
        if (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not 0 <= timeout <= 3600
        ):
            raise RequestError(
                P.E_BAD_REQUEST, "'timeout' must be a number of seconds in [0, 3600]"
            )
        with bg.cond:
            bg.cond.wait_for(lambda: bg.ended is not None, timeout=float(timeout))
        return bg.info(), b""

    def proc_output(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        bg = self._bg(h)
        stream = h.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise RequestError(P.E_BAD_REQUEST, "'stream' must be stdout or stderr")
        offset = want_int(h, "offset", 0, 0, 1 << 62)
        length = want_int(h, "length", P.CHUNK, 0, P.MAX_PAYLOAD)
        with bg.cond:
            ring = bg.rings[stream]
            data, start, lost = ring.read(offset, length)
            end = ring.end
        return {"offset": start, "lost": lost, "end": end, "running": bg.ended is None}, data

    def proc_stdin(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        bg = self._bg(h)
        eof = want_bool(h, "eof", False)
        threading.Thread(target=self._feed_stdin, args=(bg.proc, payload, eof), daemon=True).start()
        return {}, b""

    def proc_signal(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        bg = self._bg(h)
        sig = want_int(h, "signal", signal.SIGTERM, 1, 64)
        if bg.ended is None:
            if sig == signal.SIGKILL:
                bg.group.kill()
            try:
                os.killpg(bg.proc.pid, sig)
            except ProcessLookupError:
                pass
        return bg.info(), b""

    # -- TCP relays (port forwards) -------------------------------------------------
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

    # -- files ------------------------------------------------------------------
    def fs_read(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        offset = want_int(h, "offset", 0, 0, 1 << 62)
        length = want_int(h, "length", P.CHUNK, 0, P.MAX_PAYLOAD)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise RequestError(P.E_IS_DIR, f"{path}: is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise RequestError(P.E_BAD_REQUEST, f"{path}: not a regular file")
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise os_error(exc, path) from None
        finally:
            os.close(fd)
        return {"size": st.st_size, "eof": offset + len(data) >= st.st_size}, data

    def fs_write(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        offset = want_int(h, "offset", 0, 0, 1 << 62)
        truncate = want_bool(h, "truncate", offset == 0)
        mode = want_int(h, "mode", 0o644, 0, 0o7777)
        parents = want_bool(h, "parents", True)
        ids = owner_ids(h)
        try:
            if parents:
                self._makedirs(os.path.dirname(path), ids)
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode)
            try:
                if not existed and ids is not None:
                    os.fchown(fd, *ids)
                view = memoryview(payload)
                pos = offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view = view[n:]
                    pos += n
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {"size": size}, b""

    @staticmethod
    def _makedirs(path: str, ids: tuple[int, int] | None) -> None:
        missing = []
        p = path
        while p and p != "/" and not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                continue
            if ids is not None:
                os.chown(d, *ids)

    def fs_list(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        entries: list[dict[str, Any]] = []
        truncated = False
        try:
            with os.scandir(path) as it:
                for e in it:
                    if len(entries) >= MAX_LIST_ENTRIES:
                        truncated = True
                        break
                    try:
                        d = stat_dict(e.stat(follow_symlinks=False))
                    except OSError:
                        continue
                    d["name"] = e.name
                    entries.append(d)
        except OSError as exc:
            raise os_error(exc, path) from None
        entries.sort(key=lambda d: d["name"])
        # Keep the reply inside one frame: trim (and say so) if names are huge.
        while entries and len(json.dumps(entries, separators=(",", ":"))) > P.MAX_HEADER - 1024:
            entries = entries[: len(entries) // 2]
            truncated = True
        return {"entries": entries, "truncated": truncated}, b""

    def fs_stat(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            raise os_error(exc, path) from None
        return stat_dict(st), b""

    def fs_mkdir(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        parents = want_bool(h, "parents", False)
        ids = owner_ids(h)
        try:
            if parents:
                self._makedirs(path, ids)
            else:
                os.mkdir(path, 0o755)
                if ids is not None:
                    os.chown(path, *ids)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}, b""

    def fs_remove(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        path = want_path(h)
        recursive = want_bool(h, "recursive", False)
        if os.path.realpath(path) == "/":  # normpath keeps "//", realpath does not
            raise RequestError(P.E_PERMISSION, "refusing to remove /")
        try:
            st = os.stat(path, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}, b""

    def fs_move(self, rid: int, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        src = want_path(h, "path")
        dst = want_path(h, "dest")
        try:
            os.rename(src, dst)
        except OSError as exc:
            raise os_error(exc, src) from None
        return {}, b""


HANDLERS = {
    P.HELLO: Agent.hello,
    P.PING: Agent.ping,
    P.SHUTDOWN: Agent.shutdown,
    P.EXEC: Agent.exec_,
    P.STDIN: Agent.stdin,
    P.SIGNAL: Agent.signal_,
    P.PROC_START: Agent.proc_start,
    P.PROC_LIST: Agent.proc_list,
    P.PROC_WAIT: Agent.proc_wait,
    P.PROC_OUTPUT: Agent.proc_output,
    P.PROC_STDIN: Agent.proc_stdin,
    P.PROC_SIGNAL: Agent.proc_signal,
    P.TCP_OPEN: Agent.tcp_open,
    P.TCP_DATA: Agent.tcp_data,
    P.TCP_ACK: Agent.tcp_ack,
    P.TCP_CLOSE: Agent.tcp_close,
    P.FS_READ: Agent.fs_read,
    P.FS_WRITE: Agent.fs_write,
    P.FS_LIST: Agent.fs_list,
    P.FS_STAT: Agent.fs_stat,
    P.FS_MKDIR: Agent.fs_mkdir,
    P.FS_REMOVE: Agent.fs_remove,
    P.FS_MOVE: Agent.fs_move,
}


# --------------------------------------------------------------------------- init


def setup_system() -> None:
    """What a tiny init does besides mounts (done by the initramfs): the hostname."""
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write("mvm")
    except OSError:
        pass


def serve_forever() -> None:
    set_oom_score("self", -1000)  # a guest that runs out of memory must not lose its agent
    port = find_port()
    agent = Agent(Channel(port))
    agent.cg.setup(os.getpid())  # its own cgroup; every command in one of its own
    log(f"cgroups: {agent.cg.describe()}")
    log(f"serving on {port}")
    agent.serve()


def init_main() -> None:
    """PID 1: reap orphans; run the agent in a child and restart it if it dies."""
    setup_system()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                serve_forever()
            except BaseException as exc:
                log(f"agent crashed: {exc!r}")
            os._exit(1)
        while True:
            try:
                pid, _ = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == child:
                break
        log("agent exited; restarting")
        time.sleep(0.5)


if __name__ == "__main__":
    if os.getpid() == 1:
        init_main()
    else:
        serve_forever()
