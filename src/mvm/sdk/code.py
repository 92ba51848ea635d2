"""``sandbox.run_code``: notebook-style cells in persistent interpreters inside the guest.

A *context* is one interpreter (``python`` or ``bash``) started as an ordinary background
process of the unprivileged user (``/run/mvm-code/code_server.py``, shipped with the
agent). A cell is an ordinary exec of a small bash client (agent/guest/code_client.sh,
builtins only, so a cell does not pay an interpreter's start-up) with the cell on stdin,
so admission, secrets, redaction, output bounds and audit apply exactly as for commands.
The context streams the cell's stdout/stderr into the exec's and ends stdout with a
result record behind a marker carrying a per-call nonce. Everything in the record comes
from the guest: it is parsed with bounds and type checks.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError, SandboxStateError
from mvm.sdk.commands import check_timeout
from mvm.sdk.live import LiveBackend
from mvm.sdk.threads import to_thread

if TYPE_CHECKING:
    from mvm.sdk.sandbox import Sandbox

LANGUAGES = ("python", "bash", "node")
CODE_DIR = "/run/mvm-code"
#: ``bash --norc --noprofile -c SCRIPT mvm-code OP CONTEXT WAIT LIMIT NONCE`` runs a cell.
CLIENT = ["bash", "--norc", "--noprofile", "-c"]
#: Largest cell, in UTF-8 bytes (the exec's stdin carries it).
MAX_CODE = 512 * 1024
DEFAULT_TIMEOUT = 300.0
#: After ``timeout_seconds`` the cell gets SIGINT; this much later its context is killed.
GRACE = 5.0
#: How long a new context may take to listen (Python start plus site imports, under TCG).
START_WAIT = 60.0
#: What the host allows the exec beyond the cell's own bounds (client start-up, slack).
HOST_MARGIN = 30.0
OUTPUT_LIMIT = 16 * 1024 * 1024
CONTEXT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
BINARY_MIMES = ("image/png", "image/jpeg")
MAX_OUTPUTS = 256

OutputCallback = Callable[[str], None]


@dataclass(frozen=True)
class CodeContext:
    """One persistent interpreter in a sandbox; pass it as ``context=`` to ``run_code``."""

    id: str
    language: str


@dataclass(frozen=True)
class CodeError:
    """An exception the cell raised (``KeyboardInterrupt`` when it was interrupted)."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class CodeResult:
    """What a cell did. ``status``: ``ok``, ``error`` (see ``error``), ``killed`` (it
    ignored the interrupt and its context was killed: the next cell starts a fresh one) or
    ``died`` (the context ended during the cell). Guest data: treat it as untrusted."""

    status: str
    context: str
    language: str
    stdout: str = ""
    stderr: str = ""
    #: The last expression's MIME bundle (``text/plain`` is its repr); empty if none.
    value: dict[str, str] = field(default_factory=dict)
    error: CodeError | None = None
    #: Rich outputs in order (display(), figures, a rich last value): MIME -> str, or bytes
    #: for images.
    outputs: list[dict[str, str | bytes]] = field(default_factory=list)
    exec_count: int | None = None
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    audit_id: str | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def killed(self) -> bool:
        return self.status == "killed"

    @property
    def text(self) -> str | None:
        """The last expression's repr, like a notebook's ``Out[n]`` (None if no value)."""
        return self.value.get("text/plain")

    @property
    def pngs(self) -> list[bytes]:
        found = (o.get("image/png") for o in self.outputs)
        return [png for png in found if isinstance(png, bytes)]

    @property
    def png(self) -> bytes | None:
        """The first PNG output (e.g. a matplotlib figure), or None."""
        found = self.pngs
        return found[0] if found else None


def check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise InvalidArgument(
            f"unsupported language {language!r}",
            hint=f"supported: {', '.join(LANGUAGES)}",
            language=language,
        )
    return language


def resolve(context: CodeContext | str | None, language: str) -> tuple[str, str]:
    """(context id, language). No context: the language's default context."""
    if isinstance(context, CodeContext):
        return context.id, check_language(context.language)
    check_language(language)
    if context is None:
        return language, language
    if not isinstance(context, str) or not CONTEXT_RE.match(context):
        raise InvalidArgument(
            f"invalid context id {context!r}",
            hint="lower-case letters, digits, '_' and '-' (max 63)",
        )
    return context, language


class Splitter:
    """Split the client's stdout into the cell's output and the record after the marker,
    holding back only a tail that could be the marker's start (so streaming stays live)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.held = b""
        self.found = False
        self.out = bytearray()
        self.record = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if self.found:
            self.record += chunk
            return b""
        data = self.held + chunk
        i = data.find(self.marker)
        if i >= 0:
            self.found, self.held = True, b""
            self.record += data[i + len(self.marker) :]
            self.out += data[:i]
            return data[:i]
        keep = 0
        for k in range(min(len(self.marker) - 1, len(data)), 0, -1):
            if data.endswith(self.marker[:k]):
                keep = k
                break
        self.held = data[len(data) - keep :] if keep else b""
        emit = data[: len(data) - keep]
        self.out += emit
        return emit

    def end(self) -> bytes:
        rest, self.held = self.held, b""
        self.out += rest
        return rest


def _s(v: object, limit: int = OUTPUT_LIMIT) -> str:
    return v[:limit] if isinstance(v, str) else ""


def parse_bundle(raw: object) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {}
    if not isinstance(raw, dict):
        return out
    for k, v in list(raw.items())[:32]:
        if not isinstance(k, str) or len(k) > 128 or not isinstance(v, str):
            continue
        if k in BINARY_MIMES:
            try:
                out[k] = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                continue
        else:
            out[k] = v
    return out


def parse_record(raw: bytes) -> dict[str, Any]:
    line = raw.split(b"\n", 1)[0]
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        raise MvmError(
            "the code client's result could not be read",
            hint="the cell's output may have been truncated (output limit); print less",
        )
    return rec


def build_result(
    rec: dict[str, Any], ctx: str, language: str, out: bytes, err: bytes, end: M.ExecEvent | None
) -> CodeResult:
    status = rec.get("status")
    if status not in ("ok", "error", "killed", "died"):
        status = "error"
    error = None
    e = rec.get("error")
    if isinstance(e, dict):
        error = CodeError(_s(e.get("name"), 256), _s(e.get("value")), _s(e.get("traceback")))
    raw_outputs = rec.get("outputs")
    outputs = (
        [parse_bundle(o) for o in raw_outputs[:MAX_OUTPUTS]]
        if isinstance(raw_outputs, list)
        else []
    )
    value_b = parse_bundle(rec.get("value"))
    value = {k: v for k, v in value_b.items() if isinstance(v, str)}
    if any(k != "text/plain" for k in value_b):
        outputs.append(value_b)
    count, code = rec.get("exec_count"), rec.get("exit_code")
    return CodeResult(
        status=status,
        context=ctx,
        language=language,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        value=value,
        error=error,
        outputs=outputs,
        exec_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        timed_out=bool(rec.get("timed_out")),
        truncated=bool(rec.get("truncated"))
        or bool(end and (end.truncated_stdout or end.truncated_stderr)),
        audit_id=end.audit_id if end else None,
        duration=end.duration if end else 0.0,
    )


class Code:
    """The run_code calls of one sandbox (``Sandbox.run_code`` and friends delegate here)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self._pending: set[str] = set()  # started here, maybe not listening yet
        self._recorded: set[str] = set()  # record mode: contexts whose start is recorded

    def run(
        self,
        code: str,
        language: str = "python",
        context: CodeContext | str | None = None,
        timeout_seconds: str | float = DEFAULT_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CodeResult:
        if not isinstance(code, str):
            raise InvalidArgument(f"code must be str, not {type(code).__name__}")
        body = code.encode()
        if len(body) > MAX_CODE:
            raise InvalidArgument(f"a cell is at most {MAX_CODE} bytes", size=len(body))
        ctx, lang = resolve(context, language)
        timeout = check_timeout(timeout_seconds)
        if self._sb._be.recording and ctx not in self._recorded:
            # A recording cannot learn that the context is missing: record its start, so a
            # replay starts it before the first cell.
            self._recorded.add(ctx)
            self._start(ctx, lang)
            self._pending.add(ctx)
        wait = START_WAIT if ctx in self._pending else 0.0
        head = {"op": "run", "context": ctx, "language": lang, "timeout": timeout}
        rec, res = self._call(head, body, wait, on_stdout, on_stderr)
        if rec.get("status") == "no_context":
            self._start(ctx, lang)
            rec, res = self._call(head, body, START_WAIT, on_stdout, on_stderr)
        self._pending.discard(ctx)
        status = rec.get("status")
        if status == "no_context":
            raise MvmError(
                f"the {lang} context {ctx!r} did not start",
                hint="the image needs python3 (bash for bash, node for node); see the sandbox's logs",
                context=ctx,
            )
        if status == "wrong_language":
            raise InvalidArgument(
                f"context {ctx!r} is a {_s(rec.get('language'), 32)} context, not {lang}",
                context=ctx,
            )
        if status == "busy":
            raise SandboxStateError(
                f"context {ctx!r} is still running another cell",
                hint="wait for it, use another context, or restart_context()",
                context=ctx,
            )
        if status == "unreachable":
            raise MvmError(
                "the code context may not reach its client's pipes",
                hint="run_code needs pidfd_getfd between processes of the guest user: "
                "kernel.yama.ptrace_scope must be 0 in the guest",
                context=ctx,
            )
        if status == "bad_request":
            raise InvalidArgument(_s(rec.get("message"), 256) or "the cell was refused")
        return res

    def create_context(self, language: str = "python", name: str | None = None) -> CodeContext:
        """Start a new interpreter (isolated from every other context) and return it."""
        check_language(language)
        ctx = name if name is not None else f"{language}-{secrets.token_hex(4)}"
        ctx, _ = resolve(ctx, language)
        self._start(ctx, language)
        self._pending.add(ctx)
        return CodeContext(ctx, language)

    def restart_context(
        self, context: CodeContext | str | None = None, language: str = "python"
    ) -> CodeContext:
        """Kill the context's processes (its state is lost) and start it afresh."""
        ctx, lang = resolve(context, language)
        self.kill_context(ctx)
        self._start(ctx, lang)
        self._pending.add(ctx)
        return CodeContext(ctx, lang)

    def kill_context(self, context: CodeContext | str) -> None:
        """End a context and every process it started; a later cell there starts afresh."""
        ctx, _ = resolve(context, "python")
        self._call({"op": "kill", "context": ctx}, b"", 0.0, None, None)
        self._pending.discard(ctx)

    def list_contexts(self) -> list[str]:
        """The ids of the contexts that answer in this sandbox."""
        rec, _ = self._call({"op": "list"}, b"", 0.0, None, None)
        names = rec.get("contexts")
        if not isinstance(names, list):
            return []
        return [n for n in names[:1000] if isinstance(n, str) and CONTEXT_RE.match(n)]

    # -- plumbing -----------------------------------------------------------------------
    def _start(self, ctx: str, language: str) -> None:
        server = f"{CODE_DIR}/code_server.py"
        flags = [] if language == "python" else ["-I", "-S"]  # python cells want site-packages
        req = M.ProcStart(argv=["python3", *flags, server, ctx, language])
        self._sb._be.start(self._sb._key, req)

    def _call(
        self,
        head: dict[str, Any],
        body: bytes,
        wait: float,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> tuple[dict[str, Any], CodeResult]:
        nonce = secrets.token_hex(16)
        op, ctx = str(head.get("op", "run")), str(head.get("context", "python"))
        cell_timeout = float(head.get("timeout", 30.0))
        argv = [*CLIENT, client_script(), "mvm-code", op, ctx, str(int(wait))]
        argv += [f"{cell_timeout + GRACE:.3f}", nonce]
        header = f"MVM1 {op} {ctx} {head.get('language', 'python')} {cell_timeout:.3f} {nonce}"
        timeout = cell_timeout + GRACE + wait + HOST_MARGIN
        req = M.ExecRequest(
            argv=argv,
            stdin=header.encode() + b"\n" + body if op == "run" else b"",
            timeout=timeout,
            output_limit=OUTPUT_LIMIT,
        )
        lang = str(head.get("language", ""))
        be, key = self._sb._be, self._sb._key
        split = Splitter(b"\x1eMVMCODE:" + nonce.encode() + b"\n")
        err = bytearray()
        end: M.ExecEvent | None = None
        if be.recording or not isinstance(be, LiveBackend):
            r = be.run(key, req, False)
            split.feed(r.stdout_bytes)
            err += r.stderr_bytes
            if be.recording:
                res = CodeResult(status="ok", context=ctx, language=lang, stdout=r.stdout)
                return {"status": "ok"}, res
        else:
            dec_out = codecs.getincrementaldecoder("utf-8")("replace")
            dec_err = codecs.getincrementaldecoder("utf-8")("replace")
            for ev in be.client.exec_stream(key, req):
                if ev.type == "stdout":
                    shown = split.feed(ev.data)
                    if on_stdout and shown:
                        on_stdout(dec_out.decode(shown))
                elif ev.type == "stderr":
                    err += ev.data
                    if on_stderr:
                        on_stderr(dec_err.decode(ev.data))
                elif ev.type == "exit":
                    end = ev
        if not split.found:
            split.end()
            raise MvmError(
                "the code client gave no result",
                hint="the image needs bash and python3; "
                + (err.decode(errors="replace")[-500:] or "no error output"),
                exit_code=end.exit_code if end else None,
            )
        rec = parse_record(bytes(split.record))
        return rec, build_result(rec, ctx, lang, bytes(split.out), bytes(err), end)


@functools.cache
def client_script() -> str:
    """The per-cell client (agent/guest/code_client.sh), passed as ``bash -c``'s script."""
    return resources.files("mvm.agent.guest").joinpath("code_client.sh").read_text()


def code_for(sandbox: Sandbox) -> Code:
    """The sandbox's ``Code`` (one per Sandbox object, so pending starts are remembered)."""
    helper = getattr(sandbox, "_code_helper", None)
    if not isinstance(helper, Code):
        helper = Code(sandbox)
        sandbox._code_helper = helper  # type: ignore[attr-defined]
    return helper


async def arun(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await to_thread(lambda: fn(*args, **kw))
