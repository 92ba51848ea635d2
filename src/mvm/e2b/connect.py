"""The Connect RPC envelope with the JSON codec (pure): what E2B's envd speaks.

A streamed message is ``[flags u8][length u32 big-endian][JSON]``; flag 0x01 means
compressed (refused here), 0x02 marks the end-of-stream frame, whose JSON is ``{}`` or
``{"error": {"code": ..., "message": ...}}``. Unary calls are plain JSON bodies; their
errors are a JSON ``{"code", "message"}`` with the HTTP status of the code.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

FLAG_COMPRESSED: Final = 0x01
FLAG_END: Final = 0x02
HEADER: Final = struct.Struct(">BI")
#: Largest message accepted from a client.
MAX_MESSAGE: Final = 4 * 1024 * 1024

#: Connect error codes and the HTTP status of each for unary calls.
CODE_STATUS: Final[dict[str, int]] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class EnvelopeError(ValueError):
    """A malformed, compressed or oversized envelope."""


def encode(message: Any, *, end: bool = False) -> bytes:
    """One frame holding ``message`` (a JSON-able value)."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(FLAG_END if end else 0, len(body)) + body


def end_frame(code: str | None = None, message: str = "") -> bytes:
    """The end-of-stream frame: success, or the error ``code`` with ``message``."""
    if code is None:
        return encode({}, end=True)
    if code not in CODE_STATUS:
        raise ValueError(f"unknown Connect code {code!r}")
    return encode({"error": {"code": code, "message": message}}, end=True)


class Decoder:
    """Incremental decoder: feed bytes as they arrive, take whole frames out."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, Any]]:
        """The ``(flags, message)`` frames completed by ``data``."""
        self._buf += data
        out: list[tuple[int, Any]] = []
        while len(self._buf) >= HEADER.size:
            flags, length = HEADER.unpack_from(self._buf)
            if flags & FLAG_COMPRESSED:
                raise EnvelopeError("compressed frames are not supported")
            if flags & ~(FLAG_COMPRESSED | FLAG_END):
                raise EnvelopeError(f"unknown frame flags {flags:#x}")
            if length > self.max_message:
                raise EnvelopeError(f"frame of {length} bytes is larger than {self.max_message}")
            if len(self._buf) < HEADER.size + length:
                break
            raw = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            try:
                out.append((flags, json.loads(raw) if raw else {}))
            except (ValueError, UnicodeDecodeError):
                raise EnvelopeError("frame is not JSON") from None
        return out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame."""
        return len(self._buf)


def decode_all(data: bytes, max_message: int = MAX_MESSAGE) -> list[tuple[int, Any]]:
    """Every frame of a complete body; a trailing partial frame is an error."""
    d = Decoder(max_message)
    frames = d.feed(data)
    if d.pending:
        raise EnvelopeError("truncated frame")
    return frames
