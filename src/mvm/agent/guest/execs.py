"""exec: one command run to its end, its output streamed to the host as it comes, bounded
by the request's output limit; the command's whole cgroup is killed when it ends or times
out (unless detached), and stdin and signals reach it by request id meanwhile.

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import os
import queue
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
        spawn,
    )
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    import cgroups as CG
    import protocol as P
    from base import AgentBase, Channel, RequestError, log, want_bool, want_int, with_spec
    from spawning import DRAIN_AFTER_EXIT, SpawnError, feed_stdin, pipe_chunks, spawn

DRAIN_CONTAINED = 30.0  # bound on sending what a killed command group left in its pipes
#: An exec with a timeout is answered at most this long after its deadline, however slowly
#: its killed group dies (the host waits ``agent.client.TIMEOUT_GRACE`` = 20 s past the
#: deadline, then fails the call). Measured under TCG on a loaded host: a 1024-task fork
#: bomb took 10-20 s to die after ``cgroup.kill``, holding its pipes open meanwhile.
ANSWER_GRACE = 8.0


class ExecHandlers(AgentBase):
    """exec, stdin and signal: the commands the host is waiting on, by request id."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.procs_lock = threading.Lock()
        self.groups: dict[int, CG.Group] = {}  # exec id -> its group (under procs_lock)
        # Ended commands are reaped and their groups removed by one long-lived thread: a
        # thread started per answer is a clone(), which waited up to 20 s behind a dying
        # fork bomb (the kernel tearing down a thousand tasks) before the answer went out.
        self.ended: queue.SimpleQueue[tuple[subprocess.Popen[bytes], CG.Group, bool]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._release_ended, daemon=True).start()

    def _release_ended(self) -> None:
        while True:
            proc, group, kill = self.ended.get()
            try:
                proc.wait()
                self.cg.release(group, kill=kill)
            except Exception as exc:  # this thread must not die
                log(f"releasing a command's group failed: {exc!r}")

    def exec_(
        self, rid: int, h: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes] | None:
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
            target=feed_stdin, args=(proc, payload, not keep_stdin), daemon=True
        )
        stdin_thread.start()

        def answer(rc: int | None) -> dict[str, Any]:
            rc = rc if rc is not None else -signal.SIGKILL
            return {
                "exit_code": rc if rc >= 0 else 128 - rc,
                "signal": -rc if rc < 0 else None,
                "timed_out": timed_out,
                "truncated": dict(truncated),
                "stdout_bytes": counts["stdout"],
                "stderr_bytes": counts["stderr"],
                "duration": time.monotonic() - started,
                "contained": group.path is not None,
            }

        timed_out = answered = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            if group.path is not None:
                # Answer first, then kill: killing a large group (a fork bomb: a thousand
                # tasks) keeps the guest's kernel busy for a while — under TCG on a loaded
                # host 20-40 s, measured — and an answer sent meanwhile reached the host
                # after its grace (agent.client.TIMEOUT_GRACE), as "did not answer in
                # time". The kill follows at once; output sent after the answer is dropped.
                self.ch.send({"t": P.OK, "id": rid, **answer(None)})
                answered = True
            group.kill()
            try:  # among a thousand dying forks it may take a while to be reaped
                proc.wait(timeout=DRAIN_AFTER_EXIT)
            except subprocess.TimeoutExpired:
                pass
        if not detach:
            group.kill()  # what the command left behind ends with it (its pipes close)
        # Once the whole group is killed nothing can hold the pipes open, so the pumps end
        # at EOF: give them time to send what is still buffered (under load a pump waits
        # on the channel's backpressure; a 1 s cut lost the tail of stderr). A detached or
        # uncontained command may leave a child holding them: then only the short wait.
        contained = group.path is not None and not detach
        now = time.monotonic()
        deadline = now + (DRAIN_CONTAINED if contained else DRAIN_AFTER_EXIT)
        if timeout is not None:  # answer in time for the host, however slow the kill is
            deadline = min(deadline, max(now + DRAIN_AFTER_EXIT, started + timeout + ANSWER_GRACE))
        if answered:  # nobody reads this exec's output any more
            deadline = now
        for th in pumps:
            th.join(max(0.0, deadline - time.monotonic()))
        stop.set()  # pumps still held open by a lingering child stop and close their pipes
        with self.procs_lock:
            self.procs.pop(rid, None)
            self.groups.pop(rid, None)
        self.ended.put((proc, group, not detach))  # the answer does not wait for the reaping
        try:
            proc.stdin.close()
        except OSError:
            pass
        return None if answered else (answer(proc.returncode), b"")

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
        th = threading.Thread(target=feed_stdin, args=(proc, payload, eof), daemon=True)
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
