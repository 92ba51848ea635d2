"""``mvmctl mcp``: mvm as MCP tools for agents, over stdio (default) or streamable HTTP.

Built on the official ``mcp`` SDK's ``MCPServer``. Each tool parses its arguments (the SDK
validates their types: a malformed call is an MCP error result, never a crash), then calls
the Python SDK in a worker thread, labelled ``mcp:<client>`` (``X-Mvm-Actor``), and
renders the answer (tools.py). mvmd does the rest — admission, secrets, redaction and the
audit records of what the tool does, with that actor — as for every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import inspect
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from mvm.client import Client, acting_as
from mvm.errors import InvalidArgument, MvmError, SandboxNotFound
from mvm.mcp import tools as T

INSTRUCTIONS = """\
mvm runs code in microVM sandboxes on this machine. run_code keeps a persistent Python
(or bash; or node where the image has it) interpreter per sandbox: variables, imports and
the working directory survive between calls, like a notebook; matplotlib figures come
back as images. If you name no sandbox, a default one is created on first use and removed
when this session ends. Sandboxes have no network unless created with network_allow.
Files live in the sandbox (/work is the working directory); nothing of this host is
visible inside."""

TOKEN_ENV = "MVM_MCP_TOKEN"
ToolFn = Callable[..., list[T.Part]]
_CLIENT_RE = re.compile(r"[^A-Za-z0-9._ -]")


SandboxArg = Annotated[
    str | None,
    Field(
        description="Sandbox name; omit to use this session's default sandbox "
        "(created on first use)"
    ),
]
TimeoutArg = Annotated[
    float, Field(gt=0, le=T.MAX_TIMEOUT, description="Seconds before it is stopped")
]
NamedSandbox = Annotated[
    str, Field(description="Name of a sandbox of that image (create it with sandbox_create)")
]


def client_name(ctx: Context[Any, Any] | None) -> str:
    """The MCP client's self-declared name (untrusted: cleaned and capped) for audit."""
    try:
        info = ctx.session.client_params.client_info  # type: ignore[union-attr]
        name = str(info.name)
    except AttributeError:
        name = "unknown"
    return _CLIENT_RE.sub("?", name)[:48] or "unknown"


def mcp_actor(ctx: Context[Any, Any] | None) -> str:
    """The audit actor of a tool call: ``mcp:<client name>`` in the actor alphabet."""
    return "mcp:" + re.sub(r"[^A-Za-z0-9_.@-]", "_", client_name(ctx))[:59]


def result(parts: list[T.Part]) -> CallToolResult:
    content: list[TextContent | ImageContent] = []
    for p in parts:
        if p.image is not None:
            import base64

            data = base64.b64encode(p.image).decode()
            content.append(ImageContent(type="image", data=data, mime_type=p.mime))
        elif p.text is not None:
            content.append(TextContent(type="text", text=p.text))
    return CallToolResult(content=list(content))


def build(image: str = "python", persist: bool = False) -> tuple[MCPServer[Any], T.Session]:
    """The server and the session state its tools share (one per stdio session)."""
    session = T.Session(image=image, persist=persist)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            await asyncio.to_thread(session.close)

    server: MCPServer[Any] = MCPServer(
        "mvm", instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING"
    )

    async def call(
        ctx: Context[Any, Any] | None,
        tool: str,
        sandbox: str | None,
        fn: Callable[[], list[T.Part]],
    ) -> CallToolResult:
        try:
            # mvmd audits the call itself (``mcp.call``, before it runs) and what the tool
            # does (launch, exec, file writes...), with the MCP client as actor: the worker
            # thread inherits this label (to_thread copies it).
            with acting_as(mcp_actor(ctx)):
                await asyncio.to_thread(note, tool, sandbox)
                return result(await asyncio.to_thread(fn))
        except MvmError as exc:
            msg = exc.message + (f"\nhint: {exc.hint}" if exc.hint else "")
            raise ToolError(msg) from None

    def note(tool: str, sandbox: str | None) -> None:
        with Client() as c:
            try:
                c.note_call("mcp", tool, sandbox)
            except (SandboxNotFound, InvalidArgument):  # the tool will say so; still noted
                c.note_call("mcp", tool)

    def tool(description: str, sandbox_arg: str = "sandbox") -> Callable[[ToolFn], ToolFn]:
        """Register ``fn`` (sync, returns parts) as the tool named after it: ``call`` audits
        it, runs it in a worker thread, renders its parts and maps mvm errors to MCP tool
        errors. The SDK reads the arguments' schema from ``fn``'s signature."""

        def register(fn: ToolFn) -> ToolFn:
            @functools.wraps(fn)
            async def run(**kw: Any) -> CallToolResult:
                # a sandbox being created is not one yet: its call is noted without it
                named = kw.get(sandbox_arg) if sandbox_arg == "sandbox" else None
                return await call(kw["ctx"], fn.__name__, named, lambda: fn(**kw))

            # The SDK reads arguments from fn's signature but the result type from this
            # one: a CallToolResult, not structured output.
            sig = inspect.signature(fn, eval_str=True)
            run.__signature__ = sig.replace(return_annotation=CallToolResult)  # type: ignore[attr-defined]
            run.__annotations__ = {**fn.__annotations__, "return": CallToolResult}
            server.tool(description=description)(run)
            return fn

        return register

    @tool(
        "Create a sandbox (a microVM). Subject to the host's admission policy. Returns its "
        "name; pass it as `sandbox` to the other tools. It is removed when this MCP session "
        "ends unless persist=true.",
        sandbox_arg="name",
    )
    def sandbox_create(
        ctx: Context[Any, Any],
        image: Annotated[
            str | None,
            Field(description="Image name, e.g. python or python-data (numpy, pandas, matplotlib)"),
        ] = None,
        name: Annotated[str | None, Field(description="Name (default: generated)")] = None,
        ttl: Annotated[str, Field(description="Lifetime, e.g. 30m, 2h")] = "30m",
        cpu_cores: Annotated[int, Field(ge=1, le=16)] = 1,
        memory_mb: Annotated[int, Field(ge=128, le=65536)] = 1024,
        network_allow: Annotated[
            list[str], Field(description="host[:port] patterns it may reach (default: no network)")
        ] = [],  # noqa: B006
        persist: Annotated[bool, Field(description="Keep it after this session")] = False,
    ) -> list[T.Part]:
        sb = session.create(image, name, ttl, cpu_cores, memory_mb, network_allow, persist)
        return [T.Part(text=f"created sandbox {sb.name} (image {sb.image})")]

    @tool("List sandboxes (name, image, state, time left).", sandbox_arg="-")
    def sandbox_list(ctx: Context[Any, Any]) -> list[T.Part]:
        import json

        import mvm

        rows = [T.info_dict(i, session) for i in mvm.Sandbox.list()]
        return [T.Part(text=T.clip(json.dumps(rows, indent=1), "listing"))]

    @tool("Stop and remove a sandbox (its files and processes are gone).")
    def sandbox_kill(ctx: Context[Any, Any], sandbox: str) -> list[T.Part]:
        session.kill(sandbox)
        return [T.Part(text=f"sandbox {sandbox} removed")]

    @tool(
        "Run code in a persistent interpreter inside a sandbox, like a notebook cell: "
        "variables, imports and the working directory survive between calls. Returns "
        "stdout, stderr, the last expression's value, errors with traceback, and images "
        "(matplotlib figures, display()). language: python, bash or node (where the "
        "image has Node, e.g. python-data). A cell past "
        "timeout_seconds is interrupted (KeyboardInterrupt)."
    )
    def run_code(
        ctx: Context[Any, Any],
        code: Annotated[str, Field(max_length=512 * 1024)],
        language: Annotated[str, Field(pattern="^(python|bash|node)$")] = "python",
        sandbox: SandboxArg = None,
        context: Annotated[
            str | None,
            Field(description="Interpreter id within the sandbox (default: one per language)"),
        ] = None,
        timeout_seconds: TimeoutArg = 120.0,
    ) -> list[T.Part]:
        sb = session.get(sandbox)
        res = sb.run_code(code, language, context=context, timeout_seconds=timeout_seconds)
        return T.render_code(res, sb.name)

    @tool(
        "Run a shell command (sh -c) in a sandbox as an unprivileged user; returns exit "
        "code, stdout and stderr."
    )
    def run_command(
        ctx: Context[Any, Any],
        command: Annotated[str, Field(min_length=1, max_length=65536)],
        sandbox: SandboxArg = None,
        cwd: Annotated[str | None, Field(description="Working directory (default /work)")] = None,
        timeout_seconds: TimeoutArg = 120.0,
    ) -> list[T.Part]:
        return T.run_command(session.get(sandbox), command, timeout_seconds, cwd)

    @tool("Write a file in a sandbox (absolute path; parents are made).")
    def write_file(
        ctx: Context[Any, Any],
        path: Annotated[str, Field(pattern="^/", max_length=4096)],
        content: str,
        base64: Annotated[bool, Field(description="content is base64 (binary files)")] = False,
        sandbox: SandboxArg = None,
    ) -> list[T.Part]:
        return T.write_file(session.get(sandbox), path, content, base64)

    @tool("Read a file from a sandbox: text, or an image for PNG/JPEG.")
    def read_file(
        ctx: Context[Any, Any],
        path: Annotated[str, Field(pattern="^/", max_length=4096)],
        sandbox: SandboxArg = None,
    ) -> list[T.Part]:
        return T.read_file(session.get(sandbox), path)

    @tool("List a directory in a sandbox (name, type, size).")
    def list_files(
        ctx: Context[Any, Any],
        path: Annotated[str, Field(pattern="^/", max_length=4096)] = "/work",
        sandbox: SandboxArg = None,
    ) -> list[T.Part]:
        return T.list_files(session.get(sandbox), path)

    @tool(
        "Expose a TCP port of a server running in the sandbox on this host's loopback; "
        "returns the http://127.0.0.1:PORT/ URL."
    )
    def sandbox_expose_port(
        ctx: Context[Any, Any],
        port: Annotated[int, Field(ge=1, le=65535)],
        sandbox: SandboxArg = None,
    ) -> list[T.Part]:
        return T.expose_port(session.get(sandbox), port)

    @tool(
        "Screenshot a page in a browser sandbox (image `browser`, created with "
        "network_allow listing the sites it may load): loads url in a fresh tab, or shows a "
        "blank tab; returns a PNG.",
    )
    def browser_screenshot(
        ctx: Context[Any, Any],
        sandbox: NamedSandbox,
        url: Annotated[str | None, Field(max_length=8192)] = None,
        full_page: bool = False,
    ) -> list[T.Part]:
        return T.browser_screenshot(sandbox, url, full_page)

    @tool("Screenshot the screen of a desktop sandbox (image `desktop`); returns a PNG.")
    def desktop_screenshot(ctx: Context[Any, Any], sandbox: NamedSandbox) -> list[T.Part]:
        return T.desktop_screenshot(sandbox)

    @tool(
        "Click at (x, y) on a desktop sandbox's screen (pixels from the top left; take a "
        "screenshot first). button: left, right, middle or double."
    )
    def desktop_click(
        ctx: Context[Any, Any],
        sandbox: NamedSandbox,
        x: Annotated[int, Field(ge=0, le=7680)],
        y: Annotated[int, Field(ge=0, le=4320)],
        button: Annotated[str, Field(pattern="^(left|right|middle|double)$")] = "left",
    ) -> list[T.Part]:
        return T.desktop_click(sandbox, x, y, button)

    @tool("Type text into the focused window of a desktop sandbox (optionally press Enter).")
    def desktop_type(
        ctx: Context[Any, Any],
        sandbox: NamedSandbox,
        text: Annotated[str, Field(min_length=1, max_length=4096)],
        press_enter: bool = False,
    ) -> list[T.Part]:
        return T.desktop_type(sandbox, text, press_enter)

    return server, session


def parse_http(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--http takes 127.0.0.1:PORT, not {addr!r}")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise InvalidArgument(
            f"--http binds loopback only, not {host!r}",
            hint="put a reverse proxy with TLS in front if it must be reached from elsewhere",
        )
    return host, int(port)


def bearer_guard(app: Any, token: str) -> Any:
    """An ASGI wrapper: every HTTP request needs ``Authorization: Bearer <token>``."""
    want = f"Bearer {token}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, want):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"www-authenticate", b"Bearer"),
                            (b"content-type", b"text/plain"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b"bearer token required\n"})
                return
        await app(scope, receive, send)

    return guarded


def serve(image: str = "python", persist: bool = False, http: str | None = None) -> None:
    server, _ = build(image, persist)
    if http is None:
        server.run()
        return
    import uvicorn

    host, port = parse_http(http)
    token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)
    if TOKEN_ENV not in os.environ:
        print(f"mvm mcp: bearer token: {token}", file=sys.stderr, flush=True)
    print(f"mvm mcp: serving http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    app = bearer_guard(server.streamable_http_app(host=host), token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
