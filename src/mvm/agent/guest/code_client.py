"""Send one cell to a run_code context and report its result (run by an ordinary exec).

stdin: one JSON header line, then the cell. The header: ``op`` (``run``, ``kill`` or
``list``), ``context``, ``language``, ``nonce``, ``timeout``, ``grace``, ``wait``.
The cell's stdout and stderr stream to ours as they come; the result is written last on
stdout as ``\\x1eMVMCODE:<nonce>\\n<json>\\n`` (the nonce came on stdin, which the cell cannot
read). Timeouts: past ``timeout`` the cell is interrupted (KeyboardInterrupt); if it has
not ended ``grace`` seconds later the context's processes are killed and ``killed`` is
reported. Standard library only; run as ``python3 -I -S``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import sys
import time
from typing import Any

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_INPUT = 2 * 1024 * 1024
MAX_LINE = 32 * 1024 * 1024
DISPLAY_LIMIT = 16 * 1024 * 1024


def socket_dir() -> str:
    return f"/tmp/.mvm-code-{os.getuid()}"


def finish(nonce: str, record: dict[str, Any]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    out = f"\x1eMVMCODE:{nonce}\n{json.dumps(record, ensure_ascii=False)}\n"
    sys.stdout.buffer.write(out.encode("utf-8", "replace"))
    sys.stdout.flush()
    return 0


def private(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def connect(path: str, wait: float) -> socket.socket | None:
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


class Lines:
    """JSON lines from the server, each bounded, with a deadline per read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self, deadline: float) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except TimeoutError:
                raise TimeoutError from None
            except OSError:
                data = b""
            if not data:
                return None
            self.buf += data
            if len(self.buf) > MAX_LINE:
                return None
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None


def kill_groups(hello: dict[str, Any], path: str) -> None:
    for pg in hello.get("pgids") or []:
        if isinstance(pg, int) and pg > 1 and pg != os.getpgrp():  # never our own group
            try:
                os.killpg(pg, signal.SIGKILL)
            except OSError:
                pass
    try:
        os.unlink(path)
    except OSError:
        pass


def list_contexts() -> list[str]:
    d = socket_dir()
    names = []
    if private(d):
        for n in sorted(os.listdir(d)):
            if n.endswith(".sock") and connect(os.path.join(d, n), 0) is not None:
                names.append(n[: -len(".sock")])
    return names


def main() -> int:
    data = sys.stdin.buffer.read(MAX_INPUT + 1)
    head, _, body = data.partition(b"\n")
    try:
        h = json.loads(head)
    except ValueError:
        h = None
    if not isinstance(h, dict) or not isinstance(h.get("nonce"), str):
        sys.stderr.write("mvm-code: bad header\n")
        return 2
    nonce = h["nonce"]
    if len(data) > MAX_INPUT:
        return finish(nonce, {"status": "bad_request", "message": "the cell is too large"})
    op = h.get("op", "run")
    if op == "list":
        return finish(nonce, {"status": "ok", "contexts": list_contexts()})
    ctx = h.get("context")
    if not isinstance(ctx, str) or not NAME_RE.match(ctx):
        return finish(nonce, {"status": "bad_request", "message": "bad context name"})
    d = socket_dir()
    path = os.path.join(d, ctx + ".sock")
    wait = float(h.get("wait") or 0)
    timeout = float(h.get("timeout") or 300)
    grace = float(h.get("grace") or 5)
    if not private(d) and wait <= 0:
        return finish(nonce, {"status": "no_context"})
    sock = connect(path, wait)
    if sock is None or not private(d):  # a socket in a directory others could write: no
        return finish(nonce, {"status": "no_context"})
    lines = Lines(sock)
    try:
        hello = lines.next(time.monotonic() + (5 if op == "kill" else timeout))
    except TimeoutError:
        return finish(nonce, {"status": "busy"})
    if not hello or hello.get("t") != "hello":
        return finish(nonce, {"status": "died"})
    if op == "kill":
        kill_groups(hello, path)
        return finish(nonce, {"status": "killed"})
    if hello.get("language") != h.get("language"):
        return finish(nonce, {"status": "wrong_language", "language": hello.get("language")})
    try:
        code = body.decode("utf-8")
    except UnicodeDecodeError:
        return finish(nonce, {"status": "bad_request", "message": "the cell is not UTF-8"})
    sock.sendall((json.dumps({"op": "run", "code": code}) + "\n").encode())
    return relay(nonce, lines, hello, path, timeout, grace)


def relay(
    nonce: str, lines: Lines, hello: dict[str, Any], path: str, timeout: float, grace: float
) -> int:
    outputs: list[dict[str, Any]] = []
    size, interrupted = 0, False
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = lines.next(deadline)
        except TimeoutError:
            if interrupted:
                kill_groups(hello, path)
                return finish(nonce, {"status": "killed", "outputs": outputs, "timed_out": True})
            interrupted = True
            try:
                lines.sock.sendall(b'{"op": "interrupt"}\n')
            except OSError:
                pass
            deadline = time.monotonic() + grace
            continue
        if msg is None:
            return finish(nonce, {"status": "died", "outputs": outputs, "timed_out": interrupted})
        t = msg.get("t")
        if t == "out":
            text = msg.get("d")
            if isinstance(text, str):
                f = sys.stdout if msg.get("s") == "stdout" else sys.stderr
                f.buffer.write(text.encode("utf-8", "replace"))
                f.flush()
        elif t == "display":
            item = msg.get("data")
            if isinstance(item, dict):
                size += sum(len(str(v)) for v in item.values())
                if size <= DISPLAY_LIMIT:
                    outputs.append(item)
        elif t == "done":
            msg.pop("t", None)
            msg["outputs"] = outputs
            msg["timed_out"] = interrupted
            msg["status"] = msg.get("status") if msg.get("status") in ("ok", "error") else "error"
            return finish(nonce, msg)


if __name__ == "__main__":
    sys.exit(main())
