"""What every part of the guest agent shares: the channel to the host, the log, and the
request errors and field checks (a request comes from the host, but is checked whole).

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent import protocol as P
    from mvm.agent.guest import cgroups as CG
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    import cgroups as CG
    import protocol as P

PORT_NAME = "org.mvm.agent"


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


class FifoLock:
    """A lock taken in the order it was asked for. A plain Lock lets a thread that sends
    in a loop (an output pump under a flood) take it again and again: an exec's answer
    waited behind a fork bomb's stderr for over 20 s, past the host's grace."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._next = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cv:
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                self._cv.wait()

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


class Channel:
    """The virtio-serial port: whole-frame writes in turn (FifoLock), lenient reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.lock = FifoLock()

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


class AgentBase:
    """The state every handler group uses: the channel and the cgroups of commands."""

    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.cg = CG.Cgroups()  # set up by serve_forever; until then process groups only

    def new_group(self, kind: str) -> CG.Group:
        """A cgroup for one command, or a process-group-only one if that cannot be made."""
        try:
            return self.cg.group(kind)
        except OSError as exc:
            log(f"no cgroup for a {kind} (process-group kill only): {exc}")
            return CG.Group(None)
