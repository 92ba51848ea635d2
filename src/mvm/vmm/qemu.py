"""A QEMU process: start it detached, wait for its sockets, capture its console, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from mvm.errors import QemuNotFound, VMError
from mvm.vmm.argv import VMConfig, build_argv

#: Console bytes kept on disk from the start of boot, and in memory from the end.
CONSOLE_HEAD = 512 * 1024
CONSOLE_TAIL = 64 * 1024
SOCKET_WAIT = 10.0


def qemu_binary() -> str:
    """The QEMU to run: ``MVM_QEMU`` if set, else qemu-system-x86_64 from PATH."""
    return os.environ.get("MVM_QEMU", "qemu-system-x86_64")


def find_qemu(name: str) -> str:
    """Absolute path of the QEMU binary, or QemuNotFound saying how to get one."""
    path = shutil.which(name)
    if path is None:
        hint = "install it: apt-get install qemu-system-x86 (or run ./install.sh)"
        if "MVM_QEMU" in os.environ:
            hint = (
                f"MVM_QEMU={os.environ['MVM_QEMU']} is not an executable; unset it or fix the path"
            )
        raise QemuNotFound(f"QEMU not found: {name}", hint=hint, qemu=name)
    return path


KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]")


def summarize_console(text: str, max_lines: int = 25) -> str:
    """What explains a failed boot: userspace output (init, agent tracebacks) and the
    kernel's panic line, without the kernel's stack dump."""
    keep = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        if not KERNEL_LINE.match(line) or re.search(r"panic|mvm|Kernel Offset|segfault", line):
            keep.append(line[:300])
    return "\n".join(keep[-max_lines:])


class BoundedLog:
    """The guest console: the first CONSOLE_HEAD bytes go to a file, the last CONSOLE_TAIL
    stay in memory; whatever the guest prints, the host keeps a bounded amount."""

    def __init__(self, path: Path, head: int = CONSOLE_HEAD, tail: int = CONSOLE_TAIL) -> None:
        self.path = path
        self.head_limit = head
        self.tail_limit = tail
        self.dropped = 0
        self._tail = bytearray()
        self._f = path.open("ab")
        self.written = self._f.tell()  # continue a log kept by an earlier host process

    def write(self, data: bytes) -> None:
        self._tail += data  # every byte, so tail() is right whether or not the head is full
        if self.written < self.head_limit:
            part = data[: self.head_limit - self.written]
            self._f.write(part)
            self._f.flush()
            self.written += len(part)
            data = data[len(part) :]
        if data:
            self.dropped += len(data)
        if len(self._tail) > self.tail_limit:
            del self._tail[: len(self._tail) - self.tail_limit]

    def tail(self, n: int = 4096) -> str:
        """The last ``n`` bytes printed (from memory, or from the file if nothing was dropped)."""
        if self.dropped:
            return bytes(self._tail[-n:]).decode(errors="replace")
        self._f.flush()
        with self.path.open("rb") as f:
            f.seek(max(0, self.written - n))
            return f.read(n).decode(errors="replace")

    def close(self) -> None:
        if self.dropped:
            self._f.write(
                f"\n[mvm: {self.dropped} console bytes not kept; last {len(self._tail)}:]\n".encode()
            )
            self._f.write(self._tail[-min(len(self._tail), self.dropped) :])
        self._f.close()


def is_qemu_for(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is a live (not zombie) QEMU whose command line names ``run_dir``."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat_line.rsplit(")", 1)[-1].split()[0] if ")" in stat_line else "?"
    return state != "Z" and str(run_dir).encode() in cmdline and b"qemu" in cmdline


class QemuProcess:
    def __init__(self, cfg: VMConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self.adopted_pid: int | None = None  # a QEMU started by an earlier daemon
        self.console: BoundedLog | None = None
        self._console_task: asyncio.Task[None] | None = None
        self.started_at = 0.0
        #: Called with each chunk the guest console prints (must not block).
        self.console_listener: Callable[[bytes], None] | None = None

    @property
    def stderr_path(self) -> Path:
        return self.cfg.run_dir / "qemu.log"

    @property
    def console_path(self) -> Path:
        return self.cfg.run_dir / "console.log"

    async def start(self) -> None:
        argv = build_argv(self.cfg)
        argv[0] = find_qemu(argv[0])
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (self.cfg.console_socket, self.cfg.agent_socket, self.cfg.qmp_socket):
            sock.unlink(missing_ok=True)  # stale ones would look like a started QEMU
        with self.stderr_path.open("wb") as err:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # detached: a signal to our group does not reach it
                close_fds=True,
            )
        await self._wait_sockets()
        self._start_console()

    def adopt(self, pid: int) -> None:
        """Take over a running QEMU (after a daemon restart): check it is ours, capture its console."""
        if not is_qemu_for(pid, self.cfg.run_dir):
            raise VMError(f"process {pid} is not the QEMU of {self.cfg.run_dir}")
        self.adopted_pid = pid
        self._start_console()

    def _start_console(self) -> None:
        self.console = BoundedLog(self.console_path)
        self._console_task = asyncio.create_task(self._pump_console())

    async def _wait_sockets(self) -> None:
        deadline = time.monotonic() + SOCKET_WAIT
        sockets = (self.cfg.console_socket, self.cfg.agent_socket, self.cfg.qmp_socket)
        while not all(s.exists() for s in sockets):
            if not self.alive():
                raise VMError(f"QEMU exited at start: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise VMError("QEMU did not create its sockets within 10s")
            await asyncio.sleep(0.005)
        # QEMU creates its sockets before it opens the RAM file: it may still fail.
        await asyncio.sleep(0)
        if not self.alive():
            raise VMError(f"QEMU exited at start: {self.stderr_tail() or 'no message'}")

    def check_alive(self, what: str) -> None:
        """Raise VMError with QEMU's own message if it has exited (call after a failure)."""
        if not self.alive():
            raise VMError(f"QEMU exited ({what}): {self.stderr_tail() or 'no message'}")

    async def _pump_console(self) -> None:
        assert self.console is not None
        deadline = time.monotonic() + SOCKET_WAIT
        while True:  # QEMU may have bound the socket but not be listening yet
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.cfg.console_socket))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline or not self.alive():
                    return
                await asyncio.sleep(0.02)
            except OSError:
                return
        try:
            while data := await reader.read(65536):
                self.console.write(data)
                if self.console_listener is not None:
                    self.console_listener(data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.adopted_pid is not None:
            return is_qemu_for(self.adopted_pid, self.cfg.run_dir)
        return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else self.adopted_pid

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def console_tail(self, n: int = 4096) -> str:
        return self.console.tail(n) if self.console else ""

    def boot_failure(self) -> str:
        """A short explanation of a failed boot from the console (or QEMU's stderr)."""
        text = self.console.tail(CONSOLE_TAIL) if self.console else ""
        return summarize_console(text) or self.stderr_tail() or "no console output"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        elif self.adopted_pid is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.adopted_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.01)

    async def stop(self) -> None:
        """Kill QEMU and stop capturing its console."""
        self.kill()
        await self.stop_capture()

    async def stop_capture(self) -> None:
        """Stop capturing the console (QEMU keeps running: it belongs to no one else now)."""
        if self._console_task is not None:
            self._console_task.cancel()
            with contextlib.suppress(BaseException):
                await self._console_task
        if self.console is not None:
            self.console.close()
            self.console = None
