"""Redaction: every secret value in output becomes ``[REDACTED:NAME]`` before it leaves mvmd.

``Redactor`` is pure: built from ``{name: value}``, it replaces each value (longest first,
so a secret that contains another is caught whole) in ``bytes`` or ``str``.
``StreamRedactor`` does the same over a stream of chunks: it holds back the tail of a
chunk that could be the start of a secret (never more than ``max(len(value)) - 1`` bytes,
and nothing when the tail cannot start one, so a line such as ``ready\n`` is not delayed),
so a value split across two chunks is still caught; ``flush()`` releases the tail at the
end. Output of the streaming form equals the one-shot form over the concatenation.

Redaction catches the literal value only: a program that encodes its secret (base64,
``rev``) defeats it. It keeps secrets out of logs and transcripts by accident, not
against a guest that means to leak what it was given.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping


def marker(name: str) -> str:
    return f"[REDACTED:{name}]"


class Redactor:
    """Replace every known secret value by its marker. Empty values are ignored."""

    def __init__(self, secrets: Mapping[str, str | bytes] | None = None) -> None:
        by_value: dict[bytes, str] = {}
        for name, value in (secrets or {}).items():
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if raw:
                by_value.setdefault(raw, name)
        self._names = dict(sorted(by_value.items(), key=lambda kv: (-len(kv[0]), kv[0])))
        self.names: tuple[str, ...] = tuple(sorted(set(by_value.values())))
        #: Longest value in bytes (0 without secrets): a stream holds back one less.
        self.max_len = max((len(v) for v in self._names), default=0)
        self._first_bytes = frozenset(v[0] for v in self._names)
        self._bytes_re: re.Pattern[bytes] | None = None
        self._text_names: dict[str, str] = {}
        self._text_re: re.Pattern[str] | None = None
        if self._names:
            self._bytes_re = re.compile(b"|".join(re.escape(v) for v in self._names))
            for raw, name in self._names.items():
                try:
                    self._text_names.setdefault(raw.decode("utf-8"), name)
                except UnicodeDecodeError:
                    continue
            if self._text_names:
                self._text_re = re.compile("|".join(re.escape(v) for v in self._text_names))

    def __bool__(self) -> bool:
        return bool(self._names)

    @property
    def pattern(self) -> re.Pattern[bytes] | None:
        return self._bytes_re

    def _bytes_sub(self, m: re.Match[bytes]) -> bytes:
        return marker(self._names[m.group(0)]).encode()

    def redact_bytes(self, data: bytes) -> bytes:
        """``data`` with every secret value replaced."""
        if self._bytes_re is None or not data:
            return data
        return self._bytes_re.sub(self._bytes_sub, data)

    def redact_text(self, s: str) -> str:
        """``s`` with every secret value replaced."""
        if self._text_re is None or not s:
            return s
        return self._text_re.sub(lambda m: marker(self._text_names[m.group(0)]), s)

    def merged(self, secrets: Mapping[str, str | bytes]) -> Redactor:
        """A redactor knowing these secrets as well (later names win for equal values)."""
        mine: dict[str, str | bytes] = {name: raw for raw, name in self._names.items()}
        return Redactor({**mine, **secrets})

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def hold_point(self, buf: bytes, start: int = 0) -> int:
        """The leftmost index >= ``start`` from which ``buf`` is a proper prefix of a secret
        (the part to hold back for more data), or ``len(buf)``."""
        n = len(buf)
        for i in range(max(start, n - self.max_len + 1), n):
            if buf[i] in self._first_bytes:
                tail = buf[i:]
                if any(len(v) > len(tail) and v.startswith(tail) for v in self._names):
                    return i
        return n


class StreamRedactor:
    """Redact a stream chunk by chunk; call ``flush()`` when the stream ends."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The redacted output that is certain so far; a possible secret prefix is held."""
        r = self.redactor
        pattern = r.pattern
        if pattern is None:
            passthrough, self._held = self._held + chunk, b""
            return passthrough
        buf = self._held + chunk
        out = bytearray()
        pos = 0
        while True:
            hold = r.hold_point(buf, pos)
            moved_past = False
            for m in pattern.finditer(buf, pos):
                if m.start() >= hold:
                    break  # could still become a longer secret: decide with more data
                out += buf[pos : m.start()]
                out += r._bytes_sub(m)
                pos = m.end()
                if pos > hold:  # the match covered the held part: look again from here
                    moved_past = True
                    break
            if not moved_past:
                break
        hold = max(hold, pos)
        out += buf[pos:hold]
        self._held = buf[hold:]
        return bytes(out)

    def flush(self) -> bytes:
        """Everything still held, redacted."""
        held, self._held = self._held, b""
        return self.redactor.redact_bytes(held)


class KnownSecrets:
    """The secret values this process has handed out, for redacting its errors and log lines.

    Errors and log records are made far from where a secret was resolved, so the daemon
    registers every value it injects here and the edges (error bodies, the logging filter)
    redact with ``current()``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._redactor = Redactor()

    def add(self, secrets: Mapping[str, str]) -> None:
        if not secrets:
            return
        with self._lock:
            self._redactor = self._redactor.merged(dict(secrets))

    def current(self) -> Redactor:
        return self._redactor


#: The process-wide registry (mvmd and one-shot runs add to it).
known = KnownSecrets()


class RedactingFilter(logging.Filter):
    """A logging filter that redacts known secret values from every record it passes."""

    def __init__(self, registry: KnownSecrets | None = None) -> None:
        super().__init__()
        self.registry = registry or known

    def filter(self, record: logging.LogRecord) -> bool:
        r = self.registry.current()
        if r:
            msg = record.getMessage()
            clean = r.redact_text(msg)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_text = r.redact_text(exc_text)
                record.exc_info = None
        return True


__all__ = ["KnownSecrets", "RedactingFilter", "Redactor", "StreamRedactor", "known", "marker"]
