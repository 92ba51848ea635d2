"""Background-process output in the sandbox log, without gaps across an mvmd restart.

The guest keeps the last 1 MiB of each process stream in a ring addressed by absolute
offsets, and each output event says the offset it starts at. mvmd records, per process
and stream, how many bytes it has put into the log (``<run dir>/proclog.jsonl``, one small
record appended per event, written after the log line), which processes it started and
which exits it logged. Each event is logged only beyond that mark; an event past it (a
gap: mvmd was not listening) triggers a catch-up that reads the missing bytes from the
guest's ring (``proc.output``) and logs them between two ``recovered`` notes, then logs
any exit it missed (exit line + one ``proc.exited`` audit record). After a reattach a
catch-up runs at once. A partial line held in memory when mvmd is killed is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from mvm.agent import protocol as P
from mvm.errors import MvmError

if TYPE_CHECKING:
    from mvm.service.core import Core
    from mvm.service.live import Live

log = logging.getLogger(__name__)

FILE_NAME = "proclog.jsonl"
#: Past this size the record file is rewritten with the current marks only.
COMPACT_AT = 64 * 1024
#: At most this much is recovered per stream per catch-up (the guest ring holds 1 MiB).
RECOVER_MAX = 2 * 1024 * 1024
STREAMS = ("stdout", "stderr")
#: Bound on the processes a catch-up is asked to look at beyond the known ones.
MAX_WANTED = 1024


class Rec(msgspec.Struct, omit_defaults=True):
    p: int
    s: str | None = None  # stream, with e: bytes logged up to e
    e: int | None = None
    x: str | None = None  # exit logged (audit id, "" when none)
    start: bool = False


class ProcLog:
    """The marks of one sandbox, loaded from and appended to its record file."""

    def __init__(self, path: Path, *, fresh: bool) -> None:
        self.path = path
        self.ends: dict[tuple[int, str], int] = {}
        self.started: set[int] = set()
        self.exited: dict[int, str] = {}
        if fresh:
            path.unlink(missing_ok=True)
        else:
            self._load()
        self._size = path.stat().st_size if path.exists() else 0
        self.catching_up: asyncio.Task[None] | None = None
        #: Processes an event named while their bytes/exit were deferred to a catch-up.
        self.wanted: set[int] = set()
        self.again = False

    def _load(self) -> None:
        dec = msgspec.json.Decoder(Rec)
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        for line in data.splitlines():
            try:
                r = dec.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            self._apply(r)

    def _apply(self, r: Rec) -> None:
        if r.start:
            self.started.add(r.p)
        if r.s in STREAMS and r.e is not None:
            self.ends[(r.p, r.s)] = max(r.e, self.ends.get((r.p, r.s), 0))
        if r.x is not None:
            self.exited[r.p] = r.x

    def _append(self, r: Rec) -> None:
        self._apply(r)
        line = msgspec.json.encode(r) + b"\n"
        try:
            if self._size + len(line) > COMPACT_AT:
                self._compact()
            with self.path.open("ab") as f:
                f.write(line)
            self._size += len(line)
        except OSError as exc:  # the run dir is gone (the sandbox is being removed)
            log.debug("proclog %s: %s", self.path, exc)

    def _compact(self) -> None:
        recs = [Rec(p=p, start=True) for p in sorted(self.started)]
        recs += [Rec(p=p, s=s, e=e) for (p, s), e in sorted(self.ends.items())]
        recs += [Rec(p=p, x=x) for p, x in sorted(self.exited.items())]
        data = b"".join(msgspec.json.encode(r) + b"\n" for r in recs)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        self._size = len(data)

    def end(self, proc: int, stream: str) -> int:
        return self.ends.get((proc, stream), 0)

    def advance(self, proc: int, stream: str, end: int) -> None:
        if end > self.end(proc, stream):
            self._append(Rec(p=proc, s=stream, e=end))

    def start(self, proc: int) -> None:
        self._append(Rec(p=proc, start=True))

    def exit(self, proc: int, audit_id: str | None) -> None:
        if proc not in self.exited:
            self._append(Rec(p=proc, x=audit_id or ""))


def install(core: Core, live: Live, *, fresh: bool) -> None:
    """Route the agent's process events through the marks (``fresh``: a new guest, no
    marks; else the marks of an earlier mvmd, and a catch-up right away)."""
    vm, book = live.vm, live.logbook
    if vm is None or book is None or vm.agent is None:
        return
    plog = ProcLog(Path(live.rec.run_dir) / FILE_NAME, fresh=fresh)
    live.proclog = plog
    for p in plog.started:  # only these get exit records (the guest cannot invent others)
        live.procs.setdefault(p, plog.exited.get(p))

    def want(proc: int) -> None:
        if len(plog.wanted) < MAX_WANTED:  # a guest naming endless processes is ignored
            plog.wanted.add(proc)
        schedule(core, live)

    def on_event(frame: P.Frame) -> None:
        h = frame.header
        proc, kind = h.get("proc"), h.get("kind")
        if not isinstance(proc, int):
            return
        if kind == "proc.output" and h.get("stream") in STREAMS:
            stream, offset = str(h["stream"]), h.get("offset")
            if not isinstance(offset, int) or offset < 0:
                return
            have = plog.end(proc, stream)
            if offset > have:  # bytes mvmd never saw: read them from the ring first
                want(proc)
                return
            data = frame.payload[have - offset :]
            if data:
                book.add(f"proc:{proc}:{stream}", data)
                plog.advance(proc, stream, offset + len(frame.payload))
        elif kind == "proc.exit":
            if plog.catching_up is not None:
                want(proc)  # the catch-up logs the exit after the output
            else:
                log_exit(core, live, proc, h.get("exit_code"), h.get("signal"))

    vm.agent.on_event = on_event
    if not fresh:
        schedule(core, live)


def log_exit(core: Core, live: Live, proc: int, exit_code: object, sig: object) -> None:
    plog = live.proclog
    if plog is None or proc in plog.exited or live.logbook is None:
        return
    live.logbook.note(f"proc {proc} exited with {exit_code}")
    plog.exit(proc, core.proc_exited(live, proc, exit_code, sig))


def schedule(core: Core, live: Live) -> None:
    """Run a catch-up (or another one after the running one: something new was seen)."""
    plog = live.proclog
    if plog is None:
        return
    if plog.catching_up is not None:
        plog.again = True
        return
    plog.catching_up = asyncio.get_running_loop().create_task(_catch_up_loop(core, live))


async def _catch_up_loop(core: Core, live: Live) -> None:
    plog = live.proclog
    assert plog is not None
    try:
        while True:
            plog.again = False
            try:
                await catch_up(core, live)
            except (MvmError, OSError) as exc:
                log.warning("recovering process output of %s failed: %s", live.name, exc)
            if not plog.again:
                break
    finally:
        plog.catching_up = None


async def catch_up(core: Core, live: Live) -> None:
    """Log what the guest's rings hold beyond the marks, then the exits not yet logged."""
    plog, vm, book = live.proclog, live.vm, live.logbook
    if plog is None or vm is None or vm.agent is None or book is None:
        return
    agent = vm.agent
    procs = {p.proc: p for p in await agent.proc_list()}
    known = plog.started | {p for p, _ in plog.ends} | plog.wanted
    plog.wanted = set()
    for num in sorted(known & set(procs)):
        info = procs[num]
        for stream in STREAMS:
            total = info.stdout_bytes if stream == "stdout" else info.stderr_bytes
            if total > plog.end(num, stream):
                await _recover(agent, live, num, stream)
        if not info.running:
            log_exit(core, live, num, info.exit_code, info.signal)


async def _recover(agent: Any, live: Live, proc: int, stream: str) -> None:
    plog, book = live.proclog, live.logbook
    assert plog is not None and book is not None
    start = offset = plog.end(proc, stream)
    got = 0
    book.note(f"recovered: proc {proc} {stream} from byte {offset} (written while mvmd was away)")
    while got < RECOVER_MAX:
        data, meta = await agent.proc_output(proc, stream, plog.end(proc, stream))
        if meta.lost:
            book.note(f"recovered: {meta.lost} bytes of proc {proc} {stream} were lost (ring)")
        have = plog.end(proc, stream)  # live events may have logged some meanwhile
        if not data or meta.offset < 0 or meta.offset + len(data) <= have:
            break
        data = data[max(0, have - meta.offset) :]
        book.add(f"proc:{proc}:{stream}", data)
        offset = max(have, meta.offset) + len(data)
        got += len(data)
        plog.advance(proc, stream, offset)
        if offset >= meta.end:
            break
    book.note(f"recovered: proc {proc} {stream} bytes {start}..{offset} end")
