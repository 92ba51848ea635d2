"""A run_code context inside the guest: one persistent interpreter behind a Unix socket.

Started by the host as an ordinary background process (``proc.start``) of the unprivileged
user: ``python3 code_server.py CONTEXT LANGUAGE``. It serves one cell at a time to
``code_client.py`` (run by an ordinary exec) over ``/tmp/.mvm-code-<uid>/<context>.sock``
in a 0700 directory, so it is no network service and no other user can reach it.

Wire: JSON lines. The client sends ``{"op": "run", "code": ...}`` and may send
``{"op": "interrupt"}``; the server sends ``hello`` (pid, language, process groups to kill),
``out`` (stream, text), ``display`` (a MIME bundle) and one ``done`` (status, value, error).

Languages: ``python`` (exec of the cell, the last expression's value shown like a notebook,
matplotlib figures as PNG, ``display()`` and ``_repr_*_`` rich outputs) and ``bash`` (an
interactive bash on pipes: ``cd``, variables and functions survive; SIGINT aborts the cell,
not the shell). Standard library only: the image may have nothing else.
"""

from __future__ import annotations

import ast
import base64
import builtins
import codecs
import fcntl
import io
import json
import linecache
import os
import re
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from typing import Any

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LANGUAGES = ("python", "bash")
MAX_LINE = 4 * 1024 * 1024  # one client message (the cell is at most 1 MiB)
OUTPUT_LIMIT = 4 * 1024 * 1024  # per stream and cell
DISPLAY_LIMIT = 16 * 1024 * 1024  # all rich outputs of one cell
TEXT_LIMIT = 1024 * 1024  # one text/plain, text/html, ... value
FLUSH_SECONDS = 0.05
CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect
RICH = (
    ("_repr_png_", "image/png", True),
    ("_repr_jpeg_", "image/jpeg", True),
    ("_repr_svg_", "image/svg+xml", False),
    ("_repr_html_", "text/html", False),
    ("_repr_markdown_", "text/markdown", False),
    ("_repr_latex_", "text/latex", False),
    ("_repr_json_", "application/json", False),
)


def socket_dir() -> str:
    return f"/tmp/.mvm-code-{os.getuid()}"


def private_dir(path: str) -> None:
    """Make (or check) a 0700 directory of ours: nobody else may reach our sockets."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit(f"mvm-code: {path} is not a private directory of uid {os.getuid()}")


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "\n...[truncated by mvm]"


class Conn:
    """The current client connection; output is dropped when there is none (or it broke)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.counts = {"stdout": 0, "stderr": 0}
        self.truncated = False
        self.display_bytes = 0

    def attach(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            self.counts = {"stdout": 0, "stderr": 0}
            self.truncated = False
            self.display_bytes = 0

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self.lock:
            if self.sock is None:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.sock = None

    def out(self, stream: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            room = OUTPUT_LIMIT - self.counts[stream]
            if room <= 0:
                self.truncated = True
                return
            if len(text) > room:
                text, self.truncated = text[:room], True
            self.counts[stream] += len(text)
        self.send({"t": "out", "s": stream, "d": text})

    def display(self, bundle: dict[str, str]) -> None:
        size = sum(len(v) for v in bundle.values())
        with self.lock:
            if self.display_bytes + size > DISPLAY_LIMIT:
                self.truncated = True
                return
            self.display_bytes += size
        self.send({"t": "display", "data": bundle})


CONN = Conn()


class Writer(io.TextIOBase):
    """sys.stdout/sys.stderr of the cell: buffered briefly, then sent to the client."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.buf: list[str] = []
        self.size = 0
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self.lock:
            self.buf.append(s)
            self.size += len(s)
            due = self.size >= 8192 or time.monotonic() - self.last >= FLUSH_SECONDS
        if due:
            self.flush()
        return len(s)

    def flush(self) -> None:
        with self.lock:
            text, self.buf, self.size = "".join(self.buf), [], 0
            self.last = time.monotonic()
        CONN.out(self.stream, text)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1 if self.stream == "stdout" else 2


def pump_fd(fd: int, stream: str) -> None:
    """Forward what child processes write to fd 1/2 (a pipe we own) to the client."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        CONN.out(stream, dec.decode(data))


def capture_fds() -> tuple[Writer, Writer]:
    """Point fds 1 and 2 at pipes we forward, and sys.stdout/err at Writers."""
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        threading.Thread(target=pump_fd, args=(r, stream), daemon=True).start()
    out, err = Writer("stdout"), Writer("stderr")

    def flusher() -> None:
        while True:
            time.sleep(0.1)
            for w in (out, err):
                if w.size:
                    w.flush()

    threading.Thread(target=flusher, daemon=True).start()
    return out, err


# --------------------------------------------------------------------------- rich output


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return b64(buf.getvalue())


def bundle_of(obj: Any) -> dict[str, str]:
    """The MIME bundle of a value: text/plain (its repr) and what ``_repr_*_`` offer."""
    out: dict[str, str] = {}
    mb = getattr(obj, "_repr_mimebundle_", None)
    if callable(mb) and not isinstance(obj, type):
        try:
            got = mb()
            if isinstance(got, tuple):
                got = got[0]
            if isinstance(got, dict):
                for k, v in got.items():
                    if isinstance(k, str) and isinstance(v, (str, bytes)):
                        out[k] = b64(v) if isinstance(v, bytes) else clip(v)
        except Exception:
            pass
    for meth, mime, binary in RICH:
        fn = getattr(obj, meth, None)
        if mime in out or not callable(fn) or isinstance(obj, type):
            continue
        try:
            got = fn()
        except Exception:
            continue
        if isinstance(got, tuple) and got:
            got = got[0]
        if got is None:
            continue
        if mime == "application/json" and not isinstance(got, str):
            try:
                got = json.dumps(got)
            except (TypeError, ValueError):
                continue
        if binary and isinstance(got, bytes):
            out[mime] = b64(got)
        elif isinstance(got, str):
            out[mime] = clip(got)
    if "image/png" not in out and type(obj).__name__ == "Figure" and hasattr(obj, "savefig"):
        try:
            out["image/png"] = figure_png(obj)
        except Exception:
            pass
    try:
        out["text/plain"] = clip(repr(obj))
    except Exception as exc:
        out["text/plain"] = f"<repr failed: {type(exc).__name__}>"
    return out


def display(*objs: Any, raw: bool = False) -> None:
    """Show values as rich outputs (like IPython's ``display``); ``raw=True`` takes MIME
    bundles (``{"text/html": "<b>hi</b>"}``) as they are."""
    sys.stdout.flush()
    for obj in objs:
        if raw and isinstance(obj, dict):
            CONN.display({str(k): str(v) for k, v in obj.items()})
        else:
            CONN.display(bundle_of(obj))


def flush_figures() -> None:
    """Every open matplotlib figure (shown or left open) becomes a PNG output, then closes."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        nums = list(plt.get_fignums())
        for num in nums:
            CONN.display(
                {"image/png": figure_png(plt.figure(num)), "text/plain": f"<Figure {num}>"}
            )
        if nums:
            plt.close("all")
    except Exception as exc:
        CONN.out("stderr", f"mvm: could not render a figure: {type(exc).__name__}: {exc}\n")


def patch_show() -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and not getattr(plt.show, "_mvm", False):

        def show(*args: Any, **kw: Any) -> None:
            sys.stdout.flush()
            flush_figures()

        show._mvm = True  # type: ignore[attr-defined]
        plt.show = show  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- kernels


class Interrupted(Exception):
    pass


class PythonKernel:
    """Cells run in the main thread (so SIGINT raises KeyboardInterrupt in them)."""

    language = "python"

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.ns["display"] = display
        self.count = 0
        self.running = False
        os.environ.setdefault("MPLBACKEND", "Agg")
        sys.path[0] = ""  # the working directory, as in a notebook; not this file's dir
        sys.stdout, sys.stderr = capture_fds()
        signal.signal(signal.SIGINT, self._sigint)
        import warnings

        warnings.filterwarnings("ignore", message=".*non-interactive.*")

    def pgids(self) -> list[int]:
        return [os.getpgrp()]

    def _sigint(self, signum: int, frame: Any) -> None:
        if self.running:
            raise KeyboardInterrupt

    def interrupt(self) -> None:
        if self.running:
            os.kill(os.getpid(), signal.SIGINT)

    def run(self, code: str) -> dict[str, Any]:
        self.count += 1
        fname = f"<cell {self.count}>"
        linecache.cache[fname] = (len(code), None, code.splitlines(True), fname)
        value: dict[str, str] | None = None
        error: dict[str, str] | None = None
        patch_show()
        try:
            try:
                self.running = True
                result = self._exec(code, fname)
            finally:
                self.running = False
            if result is not None:
                self.ns["_"] = result
                value = bundle_of(result)
        except BaseException as exc:
            self.running = False
            error = self._error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        patch_show()
        flush_figures()
        return {
            "status": "error" if error else "ok",
            "value": value,
            "error": error,
            "exec_count": self.count,
        }

    def _exec(self, code: str, fname: str) -> Any:
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        tree = ast.parse(code, filename=fname)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            expr_stmt = tree.body.pop()
            assert isinstance(expr_stmt, ast.Expr)
            last = ast.Expression(expr_stmt.value)
        body = compile(tree, fname, "exec", flags=flags)
        result = eval(body, self.ns)
        if body.co_flags & CO_COROUTINE:
            self._await(result)
        if last is None:
            return None
        expr = compile(last, fname, "eval", flags=flags)
        value = eval(expr, self.ns)
        if expr.co_flags & CO_COROUTINE:
            value = self._await(value)
        return value

    def _await(self, coro: Any) -> Any:
        import asyncio

        loop = self.ns.get("__mvm_loop__")
        if loop is None:
            loop = asyncio.new_event_loop()
            self.ns["__mvm_loop__"] = loop
        return loop.run_until_complete(coro)

    @staticmethod
    def _error(exc: BaseException) -> dict[str, str]:
        te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if f.filename != __file__]  # the cell's frames, not ours
        )
        lines = list(te.format())
        try:
            text = str(exc)
        except Exception:
            text = "<str failed>"
        return {
            "name": type(exc).__name__,
            "value": clip(text, 65536),
            "traceback": clip("".join(lines), 262144),
        }


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
                try:
                    return int(line.strip() or b"1")
                except ValueError:
                    return 1
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


# --------------------------------------------------------------------------- serving


def read_lines(sock: socket.socket, on_line: Any) -> None:
    """Call ``on_line(dict)`` for each JSON line; bounded; ends at EOF or garbage."""
    buf = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            on_line({"op": "eof"})
            return
        buf += data
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if not isinstance(msg, dict):
                on_line({"op": "eof"})
                return
            on_line(msg)
        if len(buf) > MAX_LINE:
            on_line({"op": "eof"})
            return


def serve(context: str, language: str) -> None:
    d = socket_dir()
    private_dir(d)
    lock = os.open(os.path.join(d, f"{context}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another server holds this context: it serves
    path = os.path.join(d, f"{context}.sock")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    workdir = os.path.join(d, f"{context}.d")
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    kernel: PythonKernel | BashKernel
    kernel = PythonKernel() if language == "python" else BashKernel(workdir)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(path + ".new")
    finally:
        os.umask(old)
    listener.listen(16)
    os.replace(path + ".new", path)  # the socket appears only when it accepts
    while True:
        try:
            sock, _ = listener.accept()
        except InterruptedError:
            continue
        except KeyboardInterrupt:
            continue
        try:
            serve_one(sock, kernel)
        except KeyboardInterrupt:
            pass
        finally:
            CONN.attach(None)
            try:
                sock.close()
            except OSError:
                pass


def serve_one(sock: socket.socket, kernel: PythonKernel | BashKernel) -> None:
    """One client: hello, one cell, done. Interrupts come on the same connection."""
    CONN.attach(sock)
    CONN.send(
        {"t": "hello", "pid": os.getpid(), "language": kernel.language, "pgids": kernel.pgids()}
    )
    import queue

    cells: queue.Queue[dict[str, Any]] = queue.Queue()
    active = [True]  # this connection's cell has not ended yet

    def on_line(msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op in ("interrupt", "eof") and active[0]:
            kernel.interrupt()  # a vanished client gave up: stop its cell
        if op == "eof" or op == "run":
            cells.put(msg)

    threading.Thread(target=read_lines, args=(sock, on_line), daemon=True).start()
    msg = cells.get()
    code = msg.get("code")
    if msg.get("op") != "run" or not isinstance(code, str):
        return
    done = kernel.run(code)
    active[0] = False
    with CONN.lock:
        done["truncated"] = CONN.truncated
    CONN.send({"t": "done", **done})


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not NAME_RE.match(argv[0]) or argv[1] not in LANGUAGES:
        print(f"usage: code_server.py CONTEXT {{{','.join(LANGUAGES)}}}", file=sys.stderr)
        return 2
    serve(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
