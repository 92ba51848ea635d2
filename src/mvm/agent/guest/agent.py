"""mvm guest agent: runs inside the VM as PID 1 and serves the host over virtio-serial.

Only the guest's Python standard library is used. The initramfs copies this
file, the modules beside it and ``protocol.py`` to ``/run/mvm/`` and execs
``python3 -I agent.py``, so a user's image can neither replace nor shadow the
agent. This module is the main loop (framing in, dispatch, the hello handshake)
and the init; each group of requests lives in its own module: ``execs``,
``procs``, ``relay`` and ``files``, over ``base`` and ``spawning``.

As PID 1 the process forks: the parent only reaps orphans (and restarts the
agent if it ever dies); the child serves requests. Every request is handled
in its own thread; frames are written whole under one lock, looping on
partial writes (virtio-serial writes are often partial).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent import protocol as P
    from mvm.agent.guest import cgroups as CG
    from mvm.agent.guest.base import Channel, RequestError, find_port, log
    from mvm.agent.guest.execs import ExecHandlers
    from mvm.agent.guest.files import FileHandlers
    from mvm.agent.guest.procs import ProcHandlers
    from mvm.agent.guest.relay import TcpHandlers
    from mvm.agent.guest.spawning import set_oom_score
    from mvm.agent.guest.system import poweroff, reseed_rng, set_clock, setup_system
else:  # in the guest: the modules copied beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cgroups as CG
    import protocol as P
    from base import Channel, RequestError, find_port, log
    from execs import ExecHandlers
    from files import FileHandlers
    from procs import ProcHandlers
    from relay import TcpHandlers
    from spawning import set_oom_score
    from system import poweroff, reseed_rng, set_clock, setup_system

MAX_THREADS = 256


class Agent(ExecHandlers, ProcHandlers, TcpHandlers, FileHandlers):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.threads = threading.BoundedSemaphore(MAX_THREADS)
        self.session: str | None = None  # the host connection that owns the TCP relays

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
        set_clock(h.get("time"))
        seed = h.get("seed")
        if isinstance(seed, str) and len(seed) <= 1024:
            reseed_rng(seed)
        session = h.get("session")
        if isinstance(session, str) and session != self.session:
            if self.session is not None:  # a new host: relays of the old one have no peer
                self.drop_relays()
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
        poweroff()
        return None


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
