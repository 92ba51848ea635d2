"""A run_code context inside the guest: one persistent interpreter behind a Unix socket.

Started by the host as an ordinary background process (``proc.start``) of the unprivileged
user: ``python3 code_server.py CONTEXT LANGUAGE``. It serves one cell at a time to
``code_client.py`` (run by an ordinary exec) over ``/tmp/.mvm-code-<uid>/<context>.sock``
in a 0700 directory, so it is no network service and no other user can reach it.

Wire: JSON lines. The client sends ``{"op": "run", "code": ...}`` and may send
``{"op": "interrupt"}``; the server sends ``hello`` (pid, language, process groups to kill),
``out`` (stream, text), ``display`` (a MIME bundle) and one ``done`` (status, value, error).

Languages: ``python`` (here: exec of the cell, the last expression's value shown like a
notebook, matplotlib figures as PNG, ``display()`` and ``_repr_*_`` rich outputs) and
``bash`` (code_bash.py). Output handling is in code_output.py. Standard library only: the
image may have nothing else.
"""

from __future__ import annotations

import ast
import base64
import builtins
import fcntl
import io
import json
import linecache
import os
import re
import signal
import socket
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

HERE = os.path.dirname(os.path.abspath(__file__))
if TYPE_CHECKING:
    from mvm.agent.guest.code_bash import BashKernel
    from mvm.agent.guest.code_output import (
        CONN,
        capture_fds,
        clip,
        drain_fds,
        private_dir,
        socket_dir,
    )
else:
    sys.path.insert(0, HERE)
    from code_bash import BashKernel
    from code_output import CONN, capture_fds, clip, drain_fds, private_dir, socket_dir

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LANGUAGES = ("python", "bash")
MAX_LINE = 4 * 1024 * 1024  # one client message (the cell is at most 1 MiB)
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


# --------------------------------------------------------------------------- python


class PythonKernel:
    """Cells run in the main thread (so SIGINT raises KeyboardInterrupt in them)."""

    language = "python"

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.ns["display"] = display
        self.count = 0
        self.running = False
        os.environ.setdefault("MPLBACKEND", "Agg")
        # The working directory first, as in a notebook; not this file's directory.
        sys.path[:] = ["", *(p for p in sys.path if p != HERE)]
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
        drain_fds()
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
