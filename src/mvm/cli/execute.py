"""``mvmctl exec NAME -- COMMAND``: the click command. A plain exec never gets here: the entry
point hands it to :mod:`mvm.cli.fastexec` (no click, msgspec or client), which takes only
command lines that mean the same to both; this is the path for the rest (``--json``,
secrets in ``-e``, unusual spellings, help and errors) and what the fast one is tested
against. Still lean: no rich, no SDK, no httpx."""

from __future__ import annotations

import sys

import click

from mvm.api import models as M
from mvm.cli.common import EXEC_TIMEOUT_EXIT, connect, emit_json, fail_on_errors, split_env, warn
from mvm.durations import parse_duration
from mvm.errors import InvalidArgument


@click.command(name="exec")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("-i", "--interactive", is_flag=True, help="Send stdin (up to 1 MiB) to the command.")
@click.option(
    "-e", "--env", "env", multiple=True, help="KEY=VALUE or KEY=secret:NAME (repeatable)."
)
@click.option("--cwd", help="Working directory (default: the image's, else /work).")
@click.option("--user", help="Guest user (default: the image's, else 'user'; 'root' allowed).")
@click.option(
    "--timeout",
    default="300s",
    show_default=True,
    help="Kill the command after this long (exit 124).",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Keep what the command leaves running after it exits (killed by default).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@fail_on_errors
def exec_(
    name: str,
    command: tuple[str, ...],
    interactive: bool,
    env: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    timeout: str,
    detach: bool,
    as_json: bool,
) -> None:
    """Run COMMAND in sandbox NAME; streams output and exits with its status."""
    stdin = b""
    if interactive:
        stdin = sys.stdin.buffer.read((1 << 20) + 1)
        if len(stdin) > 1 << 20:
            raise InvalidArgument("stdin is larger than 1 MiB", hint="copy it in with `mvmctl cp`")
    plain_env, secret_env = split_env(env)
    req = M.ExecRequest(
        argv=list(command),
        env=plain_env,
        secret_env=secret_env,
        cwd=cwd,
        user=user,
        stdin=stdin,
        timeout=parse_duration(timeout, "timeout"),
        detach=detach,
    )

    def show(stream_name: str, data: bytes) -> None:
        stream = sys.stdout.buffer if stream_name == "stdout" else sys.stderr.buffer
        stream.write(data)
        stream.flush()

    with connect() as c:
        final = M.gather_exec(
            c.exec_stream(name, req), on_output=None if as_json else show, keep=as_json
        )
    out = {"stdout": final.stdout, "stderr": final.stderr}
    code = EXEC_TIMEOUT_EXIT if final.timed_out else (final.exit_code or 0)
    if as_json:
        emit_json(
            {
                "sandbox": name,
                "exit_code": code,
                "stdout": out["stdout"].decode(errors="replace"),
                "stderr": out["stderr"].decode(errors="replace"),
                "duration": final.duration,
                "timed_out": final.timed_out,
                "signal": final.signal,
                "truncated": {"stdout": final.truncated_stdout, "stderr": final.truncated_stderr},
                "audit_id": final.audit_id,
            }
        )
    elif final.timed_out:
        warn(f"[bold red]mvm:[/] command timed out after {req.timeout:g}s")
    sys.exit(code)
