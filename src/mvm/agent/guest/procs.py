"""Background processes (proc.*): started, then left running; their output kept in rings
in the guest (re-readable after a host restart) and announced as events, sent by one
thread so no producer ever blocks on the channel.

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent import protocol as P
    from mvm.agent.guest import cgroups as CG
    from mvm.agent.guest.base import (
        AgentBase,
        Channel,
        RequestError,
        log,
        want_bool,
        want_int,
        with_spec,
    )
    from mvm.agent.guest.spawning import (
        DRAIN_AFTER_EXIT,
        SpawnError,
        feed_stdin,
        pipe_chunks,
        short_argv,
        spawn,
    )
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    import cgroups as CG
    import protocol as P
    from base import AgentBase, Channel, RequestError, log, want_bool, want_int, with_spec
    from spawning import DRAIN_AFTER_EXIT, SpawnError, feed_stdin, pipe_chunks, short_argv, spawn


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


class ProcHandlers(AgentBase):
    """proc.start, list, wait, output, stdin and signal, by the process's own number."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.bg: dict[int, Background] = {}
        self.bg_lock = threading.Lock()
        self.bg_next = 1
        self.events = EventQueue(channel)

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
            target=feed_stdin, args=(proc, payload, not keep_stdin), daemon=True
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
        threading.Thread(target=feed_stdin, args=(bg.proc, payload, eof), daemon=True).start()
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
