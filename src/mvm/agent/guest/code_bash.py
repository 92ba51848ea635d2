"""run_code's bash contexts: an interactive bash on pipes, driven by code_server.py."""

from __future__ import annotations

import codecs
import os
import select
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mvm.agent.guest.code_output import CONN
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from code_output import CONN


class BashKernel:
    """An interactive bash on pipes. Each cell is sourced from a file with stdin from
    /dev/null; its status comes back on fd 3. Interactive bash survives SIGINT and
    abandons the current command, like Ctrl-C at a prompt."""

    language = "bash"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.count = 0
        self.running = False
        self.proc: Any = None
        self.status_fd = -1
        self.status_buf = b""
        # A handler, not SIG_IGN: an ignored signal would be inherited by bash.
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        self.start()

    def start(self) -> None:
        import subprocess

        if self.proc is not None:  # a restart: let go of the old shell's pipes
            os.close(self.status_fd)
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                f.close()
        r, w = os.pipe()
        env = dict(os.environ, PS1="", PS2="", PS0="", PROMPT_COMMAND="", HISTFILE="/dev/null")
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "--noediting", "-i"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(w,),
            env=env,
            process_group=0,
            close_fds=True,
        )
        os.close(w)
        self.status_fd = r
        self.status_buf = b""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"set +H +m; exec 3>&{w}; exec {w}>&-\nprintf '0\\n' >&3\n".encode())
        self.proc.stdin.flush()
        self._pump(discard=True)  # bash's start-up chatter ("no job control") is nobody's

    def pgids(self) -> list[int]:
        return [os.getpgrp(), self.proc.pid]

    def interrupt(self) -> None:
        if self.running:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except OSError:
                pass

    def run(self, code: str) -> dict[str, Any]:
        self.count += 1
        if self.proc.poll() is not None:
            self.start()
        path = os.path.join(self.workdir, "cell.sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code if code.endswith("\n") else code + "\n")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.running = True
        try:
            self.proc.stdin.write(f". {path} </dev/null 3>&-\nprintf '%s\\n' \"$?\" >&3\n".encode())
            self.proc.stdin.flush()
        except OSError:
            pass
        rc = self._pump()
        self.running = False
        if rc is None:
            return {
                "status": "error",
                "value": None,
                "exec_count": self.count,
                "error": {
                    "name": "ShellExited",
                    "value": "the shell exited; the next cell starts a new one (state is lost)",
                    "traceback": "",
                },
            }
        error = None
        if rc != 0:
            name = "KeyboardInterrupt" if rc == 130 else "ExitCode"
            error = {"name": name, "value": str(rc), "traceback": ""}
        return {
            "status": "error" if error else "ok",
            "value": None,
            "error": error,
            "exec_count": self.count,
            "exit_code": rc,
        }

    def _pump(self, discard: bool = False) -> int | None:
        """Forward output until the status line comes (or the shell is gone)."""
        line = self._pump_line(discard)
        if line is None:
            return None
        try:
            return int(line.strip() or b"1")
        except ValueError:
            return 1

    def _pump_line(self, discard: bool = False) -> bytes | None:
        """Forward output until a line comes on fd 3 (None: the child is gone)."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        fds = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        decs = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in fds}
        for fd in fds:
            os.set_blocking(fd, False)
        while True:
            ready, _, _ = select.select([*fds, self.status_fd], [], [], 1.0)
            for fd in ready:
                if fd == self.status_fd:
                    data = os.read(fd, 4096)
                    if not data:
                        return None
                    self.status_buf += data
                else:
                    self._drain(fd, fds[fd], decs[fd], discard)
            if b"\n" in self.status_buf:
                line, _, self.status_buf = self.status_buf.partition(b"\n")
                for fd in fds:  # output written before the status is in the pipes now
                    self._drain(fd, fds[fd], decs[fd], discard)
                return line
            if not ready and self.proc.poll() is not None:
                return None

    @staticmethod
    def _drain(fd: int, stream: str, dec: Any, discard: bool = False) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            if not discard:
                CONN.out(stream, dec.decode(data))
