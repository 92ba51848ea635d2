"""Starting a command for the host: argv, env, cwd and user checked, the process put into
its cgroup behind a gate before it runs, and its pipes read and fed without ever letting
one command's pipe be read or closed by another's thread.

Standard library only: it runs in the guest beside ``agent.py`` (see there).
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # type checking, or on the host (tests): the package
    from mvm.agent import protocol as P
    from mvm.agent.guest import cgroups as CG
    from mvm.agent.guest.base import RequestError, log, want_str
else:  # in the guest: the files beside agent.py, which put their folder on sys.path
    import cgroups as CG
    import protocol as P
    from base import RequestError, log, want_str

DEFAULT_USER = "user"
DRAIN_AFTER_EXIT = 1.0  # seconds pipes may stay open after the command exited
#: A pipe's output becomes at most one frame per FRAME_GAP seconds while it keeps coming
#: (the first chunk after a quiet FRAME_GAP goes at once). A fork bomb's stderr — a
#: thousand shells each printing "fork: retry" — came as ~70 one-line frames a second,
#: more than a loaded TCG host moved end to end: the exec's answer queued behind them
#: for over 20 s.
FRAME_GAP = 0.05
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def resolve_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RequestError(P.E_BAD_REQUEST, f"unknown user '{name}' in the guest") from None


class SpawnError(Exception):
    """The command could not be started: 127 (not found) or 126 (cannot execute)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def spawn(h: dict[str, Any], group: CG.Group | None = None) -> subprocess.Popen[bytes]:
    """Start the command a request describes (argv, env, cwd, user), with pipes, in a
    new session and (given one) in ``group``'s cgroup before it runs a single instruction
    of its own. Raises RequestError for a bad request, SpawnError if it cannot run."""
    argv = h.get("argv")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\x00" not in a for a in argv)
    ):
        raise RequestError(P.E_BAD_REQUEST, "'argv' must be a non-empty list of strings")
    pw = resolve_user(want_str(h, "user", DEFAULT_USER))
    env_in = h.get("env", {})
    if not isinstance(env_in, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\x00" not in k + v
        for k, v in env_in.items()
    ):
        raise RequestError(P.E_BAD_REQUEST, "'env' must map names to strings")
    env = {
        "PATH": PATH,
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "LANG": "C.UTF-8",
    }
    env.update(env_in)
    cwd = h.get("cwd")
    if cwd is None:
        cwd = "/work" if os.path.isdir("/work") else pw.pw_dir
    elif not isinstance(cwd, str) or "\x00" in cwd:
        raise RequestError(P.E_BAD_REQUEST, "'cwd' must be a string")
    if not os.path.isdir(cwd):
        raise RequestError(P.E_NOT_FOUND, f"working directory {cwd} does not exist")
    other = pw.pw_uid != os.getuid()
    gated = group is not None and group.path is not None
    cmd = argv
    if gated:
        check_runnable(argv[0], env["PATH"], cwd)
        cmd = ["/bin/sh", "-c", GATE, argv[0], *argv]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            user=pw.pw_uid if other else None,
            group=pw.pw_gid if other else None,
            extra_groups=[] if other else None,
            start_new_session=True,
            close_fds=True,
        )
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SpawnError(127, f"command not found: {argv[0]}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise SpawnError(126, f"cannot execute: {argv[0]}: {exc.strerror or exc}") from None
    # Still behind the gate (gated) or already running (not): OOM-killable again (the
    # agent's -1000 is inherited), into its cgroup, then through the gate.
    set_oom_score(proc.pid, 0)
    try:
        if group is not None:
            try:
                group.add(proc.pid)
            except OSError as exc:
                log(f"cannot move a command into its cgroup (process-group kill only): {exc}")
                group.path = None
    finally:
        if gated and proc.stdin is not None:
            try:  # the gate's line, before any of the command's own stdin
                os.write(proc.stdin.fileno(), b"\n")
            except OSError:
                pass
    return proc


#: The gate a command waits behind (``sh -c GATE argv0 argv...``): until the agent has
#: moved it into its cgroup and writes one line to its stdin (``read`` takes a pipe byte
#: by byte, so nothing after the line is consumed); then the command replaces the shell
#: (same pid, session, cgroup), so nothing it forks is outside.
GATE = 'read -r _; exec "$@"'


def check_runnable(prog: str, path: str, cwd: str) -> None:
    """SpawnError (127 not found, 126 not executable) before a gated start, as a direct
    exec would have said: behind the gate, the shell would report it in its own words."""
    if "/" in prog:
        full = os.path.join(cwd, prog)
        if not os.path.exists(full):
            raise SpawnError(127, f"command not found: {prog}")
        if os.path.isdir(full) or not os.access(full, os.X_OK):
            raise SpawnError(126, f"cannot execute: {prog}: Permission denied")
    else:
        found = shutil.which(prog, path=path)
        if found is None:
            raise SpawnError(127, f"command not found: {prog}")
        full = found
    # execve refuses (ENOEXEC) what is neither a script nor an ELF binary, but the gate's
    # shell would run it as a shell script: refuse it here as execve would.
    try:
        if not stat.S_ISREG(os.stat(full).st_mode):  # a FIFO would block the open below
            raise SpawnError(126, f"cannot execute: {prog}: Permission denied")
        with open(full, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # unreadable but executable: let the exec itself decide
    if not (head.startswith(b"#!") or head == b"\x7fELF"):
        raise SpawnError(126, f"cannot execute: {prog}: Exec format error")


def pipe_chunks(f: Any, stop: threading.Event) -> Iterator[bytes]:
    """Yield what a command's pipe gives until EOF or ``stop``, then close the pipe.

    The reader closes the pipe itself, never another thread: a pipe kept open by a
    lingering background child would otherwise be closed under a reader still blocked
    on it, its fd number reused by the next command's pipe, and that output stolen.
    """
    try:
        fd = f.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        last = 0.0
        while not stop.is_set():
            if not poller.poll(200):
                continue
            try:
                chunk = os.read(fd, P.CHUNK)
            except OSError:
                return
            if not chunk:
                return
            eof = False
            while len(chunk) < P.CHUNK and not stop.is_set():  # gather until FRAME_GAP
                left = last + FRAME_GAP - time.monotonic()
                if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                    break
                try:
                    more = os.read(fd, P.CHUNK - len(chunk))
                except OSError:
                    more = b""
                if not more:
                    eof = True
                    break
                chunk += more
            last = time.monotonic()
            yield chunk
            if eof:
                return
    finally:
        try:
            f.close()
        except OSError:
            pass


def set_oom_score(pid: int | str, score: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError:
        pass


def short_argv(argv: list[str], budget: int = 16 * 1024) -> list[str]:
    """A command line to show in replies and events: at most 64 arguments of at most 256
    characters, 16 KiB of JSON in all (a command may carry up to protocol.MAX_SPEC; a
    header only 64 KiB)."""
    out = []
    for a in argv[:64]:
        a = a if len(a) <= 256 else a[:253] + "..."
        budget -= len(json.dumps(a))
        if budget < 0:
            break
        out.append(a)
    return out


def feed_stdin(proc: subprocess.Popen[bytes], data: bytes, close: bool) -> None:
    """Write ``data`` to the command's stdin (then maybe close it); a gone reader is fine."""
    assert proc.stdin is not None
    try:
        if data:
            proc.stdin.write(data)
            proc.stdin.flush()
        if close:
            proc.stdin.close()
    except (OSError, ValueError):
        pass
