"""Per-sandbox log: console lines and background-process output, bounded on disk.

Lines are JSONL ``LogEvent`` records in ``events.jsonl`` (rotated once to
``events.jsonl.1`` past MAX_BYTES). Followers wait on a condition; the guest's
bytes are decoded leniently and split into lines of at most MAX_LINE bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from mvm.api.models import LogEvent
from mvm.redact import Redactor, StreamRedactor

MAX_BYTES = 8 * 1024 * 1024
MAX_LINE = 4096


class LogBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("ab")
        self._size = self._f.tell()
        self._partial: dict[str, bytearray] = {}
        self._changed = asyncio.Event()
        self.closed = False
        #: Secret values of this sandbox: redacted before anything reaches the file.
        self.redactor = Redactor()
        self._redacting: dict[str, StreamRedactor] = {}

    def add(self, stream: str, data: bytes) -> None:
        """Append guest output; whole lines are written, a trailing part waits for more."""
        sr = self._redacting.setdefault(stream, StreamRedactor(self.redactor))
        sr.redactor = self.redactor
        data = sr.feed(data)  # a value split across chunks is still caught
        buf = self._partial.setdefault(stream, bytearray())
        buf += data
        lines = []
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    lines.append(bytes(buf[:MAX_LINE]))
                    del buf[:MAX_LINE]
                    continue
                break
            lines.append(bytes(buf[:nl][:MAX_LINE]))
            del buf[: nl + 1]
        now = time.time()
        for raw in lines:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            self._write(LogEvent(timestamp=now, stream=stream, message=text))

    def note(self, message: str) -> None:
        """A line from mvmd itself (lifecycle: started, paused, failed...)."""
        self._write(LogEvent(timestamp=time.time(), stream="mvmd", message=message))

    def _write(self, ev: LogEvent) -> None:
        if self.closed:
            return
        if self.redactor:
            ev.message = self.redactor.redact_text(ev.message)
        line = msgspec.json.encode(ev) + b"\n"
        if self._size + len(line) > MAX_BYTES:
            self._f.close()
            self.path.replace(self.path.with_name(self.path.name + ".1"))
            self._f = self.path.open("ab")
            self._size = 0
        self._f.write(line)
        self._f.flush()
        self._size += len(line)
        self._notify()

    def _notify(self) -> None:
        """Wake every follower: each waits on the event current when it last read."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self.closed = True
        self._f.close()
        self._notify()

    def _read_all(self, since: float | None) -> tuple[list[LogEvent], int]:
        out: list[LogEvent] = []
        decoder = msgspec.json.Decoder(LogEvent)
        offset = 0
        for p in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                data = p.read_bytes()
            except OSError:
                continue
            if p == self.path:
                offset = len(data)
            for line in data.splitlines():
                try:
                    ev = decoder.decode(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if since is None or ev.timestamp >= since:
                    out.append(ev)
        return out, offset

    async def read(self, *, follow: bool, since: float | None) -> AsyncIterator[LogEvent]:
        changed = self._changed  # taken before reading, so no write is missed
        events, offset = self._read_all(since)
        for ev in events:
            yield ev
        if not follow:
            return
        decoder = msgspec.json.Decoder(LogEvent)
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
            changed = self._changed
            try:
                with self.path.open("rb") as f:
                    size = f.seek(0, 2)
                    if size < offset:  # rotated
                        offset = 0
                    f.seek(offset)
                    data = f.read()
            except OSError:
                return
            # Only whole lines; keep a partial one for next time.
            cut = data.rfind(b"\n") + 1
            offset += cut
            for line in data[:cut].splitlines():
                try:
                    yield decoder.decode(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
