"""A run_code context inside the guest: one persistent interpreter serving cells.

Started by the host as an ordinary background process (``proc.start``) of the unprivileged
user: ``python3 code_server.py CONTEXT LANGUAGE [--preload MOD,...]``. Its state lives in
``/tmp/.mvm-code-<uid>/`` (a 0700 directory: no other user reaches it; no network):
``CONTEXT.req`` (a FIFO of requests), ``CONTEXT.pid`` (present once it takes cells) and
``CONTEXT.pgids`` (what ``kill`` kills).

A cell is an ordinary exec of ``code_client.sh`` (bash builtins only) that writes its pid
to the FIFO and waits. We take copies of its stdin, stdout and stderr (pidfd_getfd: the
exec's pipes are the agent's, so they cannot be opened by path), read the header and the
cell from the first, stream the cell's output into the others and end stdout with the
result record behind ``\\x1eMVMCODE:<nonce>\\n``; then we say ``done`` on its fd 3.
Cells run one at a time, in the order they came. At the cell's timeout it is interrupted
(KeyboardInterrupt); if the client goes away (the host gave up) too. The client kills the
context if no answer comes ``grace`` seconds later.

Languages: ``python`` (here: exec of the cell, the last expression's value shown like a
notebook, matplotlib figures as PNG, ``display()`` and ``_repr_*_`` rich outputs) and
``bash`` (code_bash.py) and ``node`` (code_node.py). Output handling is in code_output.py. Standard library only: the
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
import select
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

HERE = os.path.dirname(os.path.abspath(__file__))
if TYPE_CHECKING:
    from mvm.agent.guest.code_bash import BashKernel
    from mvm.agent.guest.code_node import NodeKernel
    from mvm.agent.guest.code_output import (
        CONN,
        Client,
        capture_fds,
        clip,
        drain_fds,
        private_dir,
        state_dir,
    )
else:
    sys.path.insert(0, HERE)
    from code_bash import BashKernel
    from code_node import NodeKernel
    from code_output import CONN, Client, capture_fds, clip, drain_fds, private_dir, state_dir

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LANGUAGES = ("python", "bash", "node")
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
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


def reseed() -> None:
    """Before the first cell: a context started in a warm template was copied into every
    sandbox with the same PRNG states; give this one its own (the agent reseeded the
    kernel's RNG on restore, so os.urandom differs)."""
    mods = sys.modules
    try:
        if "random" in mods:
            mods["random"].seed()
        if "tempfile" in mods:
            mods["tempfile"]._name_sequence = None  # type: ignore[attr-defined]
        if "numpy.random" in mods:
            mods["numpy.random"].seed()
    except Exception:
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
        if self.count == 1:
            reseed()
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


def parse_request(data: bytes, language: str) -> tuple[dict[str, Any], str] | None:
    """``MVM1 run CONTEXT LANGUAGE TIMEOUT NONCE\\n`` and the cell; None if malformed."""
    head, _, body = data.partition(b"\n")
    parts = head.decode("ascii", "replace").split(" ")
    if len(parts) != 6 or parts[:2] != ["MVM1", "run"] or not NONCE_RE.match(parts[5]):
        return None
    try:
        timeout = float(parts[4])
        code = body.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if not 0 < timeout <= 90000:
        return None
    return {"context": parts[2], "language": parts[3], "timeout": timeout, "nonce": parts[5]}, code


class Server:
    """One context: a request FIFO (pids of waiting clients, one per line), an acceptor
    thread that takes each client's cell, and the main thread running cells in order."""

    def __init__(self, context: str, language: str, modules: list[str]) -> None:
        import queue

        self.context, self.language = context, language
        d = state_dir()
        private_dir(d)
        self.base = os.path.join(d, context)
        lock = os.open(self.base + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for _ in range(100):  # a killed predecessor lets go of it when the kernel reaps it
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit(0)  # another server holds this context: it serves
        workdir = self.base + ".d"
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        self.kernel: PythonKernel | BashKernel
        if language == "python":
            self.kernel = PythonKernel()
        elif language == "node":
            self.kernel = NodeKernel(workdir)
        else:
            self.kernel = BashKernel(workdir)
        preload(modules)
        self.write_pgids()
        fifo = self.base + ".req"
        try:
            os.unlink(fifo)  # requests to a dead predecessor are nobody's
        except FileNotFoundError:
            pass
        os.mkfifo(fifo, 0o600)
        self.fifo = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)  # never EOF, never blocks
        self.fifo_st = os.fstat(self.fifo)
        self.queue: queue.Queue[tuple[Client, float]] = queue.Queue()
        threading.Thread(target=self.accept, daemon=True).start()
        with open(self.base + ".pid.new", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(self.base + ".pid.new", self.base + ".pid")  # now clients come

    def write_pgids(self) -> None:
        """What ``kill`` (code_client.sh) kills: the process groups of this context."""
        with open(self.base + ".pgids.new", "w") as f:
            f.write(" ".join(str(p) for p in self.kernel.pgids()) + "\n")
        os.replace(self.base + ".pgids.new", self.base + ".pgids")

    def accept(self) -> None:
        buf = b""
        while True:
            data = os.read(self.fifo, 4096)
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if not line.isdigit() or len(line) > 10:
                    continue
                try:
                    client = Client(int(line), self.fifo_st)
                except (OSError, ValueError):
                    continue  # gone, not ours, or not a client: nobody to answer
                self.queue.put((client, time.monotonic()))
            if len(buf) > 4096:
                buf = b""

    def serve_forever(self) -> None:
        while True:
            try:
                client, came = self.queue.get()
                self.serve_one(client, came)
                self.write_pgids()  # a bash that exited was started afresh
            except KeyboardInterrupt:
                pass
            except OSError:
                pass

    def serve_one(self, client: Client, came: float) -> None:
        CONN.attach(client)
        try:
            req = parse_request(client.stdin, self.language)
            if req is None:
                return CONN.record("0" * 32, {"status": "bad_request", "message": "bad request"})
            head, code = req
            nonce = head["nonce"]
            if head["context"] != self.context:
                return CONN.record(nonce, {"status": "bad_request", "message": "wrong context"})
            if head["language"] != self.language:
                return CONN.record(nonce, {"status": "wrong_language", "language": self.language})
            left = head["timeout"] - (time.monotonic() - came)
            if left <= 0:
                return CONN.record(nonce, {"status": "busy"})
            done, timed_out = self.run(client, code, left)
            CONN.record(nonce, {**done, "timed_out": timed_out})
        finally:
            CONN.attach(None)
            client.done()

    def run(self, client: Client, code: str, timeout: float) -> tuple[dict[str, Any], bool]:
        """Run the cell; interrupt it at ``timeout`` or when its client goes away."""
        r, w = os.pipe()
        flags = [False]  # interrupted at the timeout

        def watch() -> None:
            poll = select.poll()
            poll.register(client.pidfd, select.POLLIN)
            poll.register(r, select.POLLIN)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                ready = poll.poll(max(0, left) * 1000 if not flags[0] else None)
                fds = {fd for fd, _ in ready}
                if r in fds:
                    return
                if client.pidfd in fds:  # the host gave up on it: stop its cell
                    CONN.attach(None)
                    client.release_output()
                    self.kernel.interrupt()
                    return
                if not ready and not flags[0]:
                    flags[0] = True
                    self.kernel.interrupt()

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        try:
            done = self.kernel.run(code)
        finally:
            os.write(w, b"x")
            th.join()
            os.close(r)
            os.close(w)
        return done, flags[0]


def preload(modules: list[str]) -> None:
    """Import modules before the context takes cells (a warm template's context has them)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            CONN.out("stderr", f"mvm-code: preload {name}: {type(exc).__name__}: {exc}\n")


def main(argv: list[str]) -> int:
    modules: list[str] = []
    if len(argv) == 4 and argv[2] == "--preload":
        modules = [m for m in argv[3].split(",") if MODULE_RE.match(m)]
        argv = argv[:2]
    if len(argv) != 2 or not NAME_RE.match(argv[0]) or argv[1] not in LANGUAGES:
        print(
            f"usage: code_server.py CONTEXT {{{','.join(LANGUAGES)}}} [--preload MOD,...]",
            file=sys.stderr,
        )
        return 2
    Server(argv[0], argv[1], modules).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
