"""Host <-> guest agent wire protocol: framing, limits and message names.

This module is shared by the host and the guest agent, so it uses only the
Python standard library and must keep working on the oldest guest Python
(Debian 12's 3.11). It is sans-IO: it turns bytes into frames and frames into
bytes, and never touches a socket.

A frame on the wire is::

    MAGIC (4 bytes "MVM1") | body length N (u32 BE) | header length H (u32 BE)
    | header (H bytes of UTF-8 JSON object) | payload (N - 4 - H raw bytes)

The JSON header carries the message (``t`` = type, ``id`` = request id); the
payload carries raw bytes (file contents, process output) so nothing is
base64-encoded. The magic lets a lenient reader (the guest) resynchronise after
garbage; the host reader is strict and treats any violation as fatal for that
sandbox, because the guest is untrusted.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"MVM1"
PREFIX = struct.Struct(">4sII")  # magic, body length, header length
PREFIX_SIZE = PREFIX.size  # 12

#: Largest header (JSON) accepted, in bytes.
MAX_HEADER = 64 * 1024
#: Largest payload carried by one frame; bigger data is sent in chunks.
MAX_PAYLOAD = 1024 * 1024
#: Largest body (header length field + header + payload).
MAX_BODY = 4 + MAX_HEADER + MAX_PAYLOAD
#: Chunk size used for streamed output and file transfers.
CHUNK = 256 * 1024
#: Default cap on captured stdout and on stderr of one command (each).
DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024
#: Largest command description (argv, env, cwd as compact JSON) of one exec/proc.start.
#: One that does not fit the header travels at the head of the payload (``"spec": N``).
MAX_SPEC = 512 * 1024
#: Largest single argument or ``KEY=VALUE`` (Linux's MAX_ARG_STRLEN, 128 KiB, with its NUL).
MAX_ARG = 128 * 1024 - 1
#: Specs up to this size stay in the header (room left for the other fields).
SPEC_IN_HEADER = MAX_HEADER - 4096

# Message types. Requests (host -> guest):
HELLO = "hello"
PING = "ping"
EXEC = "exec"
STDIN = "stdin"  # more stdin for a running exec: {"ref": exec id}, payload = data
SIGNAL = "signal"  # {"ref": exec id, "signal": int}
FS_READ = "fs.read"
FS_WRITE = "fs.write"
FS_LIST = "fs.list"
FS_STAT = "fs.stat"
FS_MKDIR = "fs.mkdir"
FS_REMOVE = "fs.remove"
FS_MOVE = "fs.move"
SHUTDOWN = "shutdown"
# Background processes, owned by the guest so they outlive any host connection:
PROC_START = "proc.start"  # like exec, but returns {"proc": id, "pid": int} at once
PROC_LIST = "proc.list"
PROC_WAIT = "proc.wait"  # {"proc": id, "timeout": s} -> state (running or exit status)
PROC_OUTPUT = "proc.output"  # {"proc", "stream", "offset", "length"} -> bytes from the ring
PROC_STDIN = "proc.stdin"  # {"proc", "eof"}, payload = data
PROC_SIGNAL = "proc.signal"  # {"proc", "signal"}
# TCP relays (port forwards without a NIC): the guest connects to 127.0.0.1:port and
# answers ``started``; guest->host bytes come as ``out`` {"stream": "tcp"} frames (an
# empty one with "eof": true at the guest's EOF), at most TCP_WINDOW bytes unacknowledged;
# the final ``ok`` comes once both directions are closed (or after ``tcp.close``).
TCP_OPEN = "tcp.open"  # {"port": 1..65535}
TCP_DATA = "tcp.data"  # {"ref": open id, "eof": bool}, payload = bytes -> ok once written
TCP_ACK = "tcp.ack"  # {"ref", "bytes"}: the host consumed that much (no reply)
TCP_CLOSE = "tcp.close"  # {"ref"}: abort the connection (no reply; the open request ends)
REQUESTS = frozenset(
    {
        PROC_START,
        PROC_LIST,
        PROC_WAIT,
        PROC_OUTPUT,
        PROC_STDIN,
        PROC_SIGNAL,
        TCP_OPEN,
        TCP_DATA,
        TCP_ACK,
        TCP_CLOSE,
        HELLO,
        PING,
        EXEC,
        STDIN,
        SIGNAL,
        FS_READ,
        FS_WRITE,
        FS_LIST,
        FS_STAT,
        FS_MKDIR,
        FS_REMOVE,
        FS_MOVE,
        SHUTDOWN,
    }
)
# Replies (guest -> host):
OK = "ok"  # final success for a request id
ERR = "err"  # final failure: {"code": str, "message": str}
OUT = "out"  # streamed output chunk: {"stream": "stdout"|"stderr"}, payload = bytes
STARTED = "started"  # exec started: {"pid": int}
READY = "ready"  # unsolicited: the agent opened its port (id 0)
EVENT = "event"  # unsolicited (id 0): {"kind": "proc.output"|"proc.exit", "proc": id, ...}
REPLIES = frozenset({OK, ERR, OUT, STARTED, READY, EVENT})

#: Output kept per background process and stream, in the guest (a ring).
PROC_RING = 1024 * 1024
#: Background processes remembered (running ones are never forgotten).
MAX_PROCS = 256
#: Largest payload of one guest->host TCP frame, and the unacknowledged bytes allowed
#: per connection (4 frames: well under the host's per-request queue of 16).
TCP_CHUNK = 128 * 1024
TCP_WINDOW = 4 * TCP_CHUNK
#: TCP relays the guest serves at once.
MAX_TCP = 128

# Error codes carried by ERR frames.
E_BAD_REQUEST = "bad_request"
E_NOT_FOUND = "not_found"
E_EXISTS = "exists"
E_PERMISSION = "permission_denied"
E_IS_DIR = "is_a_directory"
E_NOT_DIR = "not_a_directory"
E_NOT_EMPTY = "not_empty"
E_NO_SPACE = "no_space"
E_TOO_LARGE = "too_large"
E_INTERNAL = "internal"
E_UNKNOWN_REF = "unknown_ref"
E_REFUSED = "connection_refused"


def command_spec(argv: list[str], env: dict[str, str], cwd: str | None) -> bytes:
    """The JSON of a command's argv, env and cwd, after checking them against the limits
    (ValueError naming the limit): the host checks before it sends, the guest trusts none."""
    if not argv:
        raise ValueError("empty command")
    for what, items in (
        ("argument", argv),
        ("environment entry", [f"{k}={v}" for k, v in env.items()]),
    ):
        for item in items:
            n = len(item.encode("utf-8", "surrogatepass"))
            if n > MAX_ARG:
                raise ValueError(
                    f"an {what} of {n} bytes exceeds the limit of {MAX_ARG} bytes "
                    "(Linux's MAX_ARG_STRLEN); pass large data as a file or on stdin"
                )
            if "\x00" in item:
                raise ValueError(f"an {what} contains a NUL byte")
    spec: dict[str, Any] = {"argv": argv, "env": env}
    if cwd is not None:
        spec["cwd"] = cwd
    data = json.dumps(spec, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_SPEC:
        raise ValueError(
            f"the command's arguments and environment take {len(data)} bytes; the limit is "
            f"{MAX_SPEC} ({MAX_SPEC // 1024} KiB); pass large data as a file or on stdin"
        )
    return data


class FrameError(ValueError):
    """The byte stream does not hold a valid frame."""

    #: True when the bad frame was well delimited and already dropped, so a
    #: lenient reader can carry on without resynchronising.
    consumed: bool = False


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    payload: bytes = b""

    @property
    def type(self) -> str:
        t = self.header.get("t")
        return t if isinstance(t, str) else ""

    @property
    def id(self) -> int:
        i = self.header.get("id", 0)  # as the decoder does: a missing id is 0
        return i if isinstance(i, int) and not isinstance(i, bool) else -1


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Serialise one frame. Raises FrameError if it would exceed the limits."""
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    if len(head) > MAX_HEADER:
        raise FrameError(f"header of {len(head)} bytes exceeds {MAX_HEADER}")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body_len = 4 + len(head) + len(payload)
    return b"".join((MAGIC, struct.pack(">II", body_len, len(head)), head, payload))


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise FrameError("header is not a JSON object")
    t = obj.get("t")
    if not isinstance(t, str) or not t:
        raise FrameError("header has no message type 't'")
    i = obj.get("id", 0)
    if not isinstance(i, int) or isinstance(i, bool) or i < 0 or i >= 2**53:
        raise FrameError("header 'id' is not a non-negative integer")
    return obj


@dataclass
class FrameDecoder:
    """Incremental decoder with a bounded buffer.

    ``strict=True`` (host side): the first violation raises FrameError and the
    decoder stays broken. ``strict=False`` (guest side): violations are counted
    in ``errors``, and the decoder skips ahead to the next MAGIC.
    """

    strict: bool = True
    max_body: int = MAX_BODY
    errors: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _broken: str | None = None

    def reset(self) -> None:
        self._buf.clear()
        self._broken = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._broken is not None:
            raise FrameError(self._broken)
        self._buf += data
        frames: list[Frame] = []
        while True:
            try:
                frame = self._next()
            except FrameError as exc:
                if self.strict:
                    self._broken = str(exc)
                    self._buf.clear()
                    raise
                self.errors += 1
                if not exc.consumed:
                    self._resync()
                continue
            if frame is None:
                return frames
            frames.append(frame)

    def _resync(self) -> None:
        # Drop at least one byte, then everything up to the next MAGIC.
        pos = self._buf.find(MAGIC, 1)
        if pos >= 0:
            del self._buf[:pos]
            return
        # No MAGIC: keep only the longest tail that could still begin one (split
        # across feeds), and always drop at least one byte so this ends.
        keep = 0
        for n in range(min(len(MAGIC) - 1, len(self._buf) - 1), 0, -1):
            if MAGIC.startswith(bytes(self._buf[-n:])):
                keep = n
                break
        del self._buf[: len(self._buf) - keep]

    def _next(self) -> Frame | None:
        buf = self._buf
        if len(buf) < len(MAGIC):
            if buf and not MAGIC.startswith(bytes(buf)):
                raise FrameError("bad magic")
            return None
        if buf[:4] != MAGIC:
            raise FrameError("bad magic")
        if len(buf) < PREFIX_SIZE:
            return None
        _, body_len, head_len = PREFIX.unpack_from(buf)
        if body_len > self.max_body:
            raise FrameError(f"frame body of {body_len} bytes exceeds {self.max_body}")
        if head_len > MAX_HEADER or head_len + 4 > body_len:
            raise FrameError(f"bad header length {head_len} for body of {body_len}")
        total = 4 + 4 + body_len  # magic + length + body
        if len(buf) < total:
            return None
        head_end = PREFIX_SIZE + head_len
        header = bytes(buf[PREFIX_SIZE:head_end])
        payload = bytes(buf[head_end:total])
        del buf[:total]
        try:
            return Frame(_parse_header(header), payload)
        except FrameError as exc:
            exc.consumed = True
            raise
