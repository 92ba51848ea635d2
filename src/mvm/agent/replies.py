"""What the host accepts from the guest agent, and the one frame shape it builds for it.

The guest is untrusted: every reply is converted strictly into one of these structs
(or an AgentProtocolError), errors become AgentError with the guest's code, and names
from a listing are checked before anyone joins them to a path. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from mvm.agent import protocol as P
from mvm.errors import AgentError, AgentProtocolError, InvalidArgument


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


def checked(frame: P.Frame, what: str) -> P.Frame:
    """The final frame of a request if it is ``ok``; AgentError for ``err``, else a
    protocol error."""
    if frame.type == P.ERR:
        code = frame.header.get("code")
        msg = frame.header.get("message")
        code = code if isinstance(code, str) else P.E_INTERNAL
        msg = msg[:2000] if isinstance(msg, str) else "error"
        raise AgentError(f"{what}: {msg}", code=code)
    if frame.type != P.OK:
        raise AgentProtocolError(f"{what}: unexpected reply type {frame.type!r}")
    return frame


def convert(frame: P.Frame, typ: type[Any], what: str) -> Any:
    """The reply's header as ``typ`` (strict), or AgentProtocolError naming the request."""
    try:
        return msgspec.convert(frame.header, typ, strict=True)
    except msgspec.ValidationError as exc:
        raise AgentProtocolError(f"{what}: malformed reply from the guest: {exc}") from None


def exec_reply(frame: P.Frame) -> ExecReply:
    """The guest's final exec frame, validated (for callers streaming ``exec_stream``)."""
    reply: ExecReply = convert(frame, ExecReply, "exec")
    return reply
