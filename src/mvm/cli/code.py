"""``mvmctl run-code`` (a cell in a sandbox's persistent interpreter) and ``mvmctl mcp``
(the MCP server for agents). Both are thin adapters over the SDK."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import click

from mvm.cli.common import fail_on_errors
from mvm.errors import InvalidArgument
from mvm.sdk.code import LANGUAGES, MAX_CODE, CodeResult

#: Exit status of a cell that ran past its timeout (as for ``run``).
TIMEOUT_EXIT = 124


def result_json(res: CodeResult) -> dict[str, Any]:
    def enc(v: str | bytes) -> str:
        return base64.b64encode(v).decode() if isinstance(v, bytes) else v

    return {
        "status": res.status,
        "context": res.context,
        "language": res.language,
        "stdout": res.stdout,
        "stderr": res.stderr,
        "text": res.text,
        "value": res.value,
        "error": None if res.error is None else res.error.__dict__,
        "outputs": [{k: enc(v) for k, v in o.items()} for o in res.outputs],
        "exec_count": res.exec_count,
        "exit_code": res.exit_code,
        "timed_out": res.timed_out,
        "truncated": res.truncated,
        "audit_id": res.audit_id,
    }


@click.command(name="run-code")
@click.argument("name")
@click.option(
    "-f",
    "--file",
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The cell to run ('-' or nothing: stdin).",
)
@click.option("-c", "--code", "code", help="The cell as an argument.")
@click.option("--language", type=click.Choice(LANGUAGES), default="python", show_default=True)
@click.option("--context", help="Context id (default: the language's default context).")
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0.1, 86400),
    help="Seconds before the cell is interrupted (then killed 5 s later).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (images base64).")
@fail_on_errors
def run_code(
    name: str,
    file: Path | None,
    code: str | None,
    language: str,
    context: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Run a cell in sandbox NAME's persistent interpreter (variables, imports and the
    working directory survive between calls). Exit 0 if it ran, 1 on an exception,
    124 if it timed out.

    \b
    Example: mvmctl run-code worker -f cell.py
             echo 'cd /tmp; export X=1' | mvmctl run-code worker --language bash
    """
    import mvm

    if code is not None and file is not None:
        raise InvalidArgument("give the cell with -f or -c, not both")
    if code is None:
        if file is None or str(file) == "-":
            data = sys.stdin.buffer.read(MAX_CODE + 1)
        else:
            with open(file, "rb") as f:
                data = f.read(MAX_CODE + 1)
        if len(data) > MAX_CODE:
            raise InvalidArgument(f"a cell is at most {MAX_CODE} bytes")
        code = data.decode("utf-8", errors="replace")

    def write(stream: Any) -> Any:
        def emit(text: str) -> None:
            stream.write(text)
            stream.flush()

        return emit

    sandbox = mvm.Sandbox.connect(name)
    res = sandbox.run_code(
        code,
        language,
        context=context,
        timeout_seconds=timeout,
        on_stdout=None if as_json else write(sys.stdout),
        on_stderr=None if as_json else write(sys.stderr),
    )
    if as_json:
        click.echo(json.dumps(result_json(res)))
    else:
        for out in res.outputs:
            kinds = ", ".join(f"{k} ({len(v)} bytes)" for k, v in out.items() if k != "text/plain")
            click.echo(f"[output: {kinds}]", err=True)
        if res.text is not None:
            click.echo(res.text)
        if res.error is not None:
            click.echo(res.error.traceback or f"{res.error.name}: {res.error.value}", err=True)
        if res.status in ("killed", "died"):
            click.echo(f"mvm: the context was {res.status}; the next cell starts afresh", err=True)
    sys.exit(TIMEOUT_EXIT if res.timed_out else 0 if res.ok else 1)


@click.command(name="mcp")
@click.option(
    "--image",
    default="python",
    show_default=True,
    help="Image of the sandbox run_code makes when none is named.",
)
@click.option("--persist", is_flag=True, help="Keep the sandboxes this session made.")
@click.option(
    "--http",
    "http",
    metavar="127.0.0.1:PORT",
    help="Serve streamable HTTP on a loopback address instead of stdio "
    "(a bearer token is required: MVM_MCP_TOKEN, or one generated and printed).",
)
def mcp(image: str, persist: bool, http: str | None) -> None:
    """Serve mvm as MCP tools (stdio by default) for agents: sandboxes, run_code,
    commands, files, ports. Every call goes through mvmd (admission, secrets, audit)."""
    from mvm.mcp.server import serve

    serve(image=image, persist=persist, http=http)


COMMANDS = [run_code, mcp]
