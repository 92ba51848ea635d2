"""``mvmctl proc ...``: background processes in a sandbox, through mvmd."""

from __future__ import annotations

import re
import signal as signals
import sys

import click

from mvm.api import models as M
from mvm.cli.common import EXEC_TIMEOUT_EXIT, connect, emit_json, fail_on_errors, split_env, warn
from mvm.cli.files import check_size
from mvm.durations import parse_duration
from mvm.errors import InvalidArgument


@click.group()
def proc() -> None:
    """Background processes: start, ls, signal, stdin, wait, kill, output."""


@proc.command(name="start")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("-e", "--env", "env", multiple=True)
@click.option("--cwd")
@click.option("--user")
@click.option("--stdin-open", is_flag=True, help="Keep stdin open for `proc stdin`.")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def proc_start(
    name: str,
    command: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    stdin_open: bool,
    as_json: bool,
) -> None:
    """Start COMMAND in the background; prints its process id."""
    plain_env, secret_env = split_env(env)
    with connect() as c:
        p = c.proc_start(
            name,
            M.ProcStart(
                argv=list(command),
                env=plain_env,
                secret_env=secret_env,
                cwd=cwd,
                user=user,
                stdin_open=stdin_open,
            ),
        )
    if as_json:
        emit_json(p)
    else:
        click.echo(p.proc)


@proc.command(name="ls")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def proc_ls(name: str, as_json: bool) -> None:
    """List background processes."""
    with connect() as c:
        procs = c.proc_list(name)
    if as_json:
        emit_json(procs)
        return
    for p in procs:
        status = "running" if p.running else f"exited {p.exit_code}"
        click.echo(f"{p.proc:>4}  pid {p.pid:<6} {status:<12} {' '.join(p.argv)[:80]}")


def _proc_id(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,15}", value):
        raise InvalidArgument(f"process id must be a number, not {value[:40]!r}")
    return int(value)


@proc.command(name="signal")
@click.argument("name")
@click.argument("proc_id")
@click.argument("sig", default="TERM")
@fail_on_errors
def proc_signal(name: str, proc_id: str, sig: str) -> None:
    """Send a signal (TERM, INT, KILL, HUP, or a number) to a background process."""
    num = (
        int(sig)
        if re.fullmatch(r"[0-9]{1,2}", sig)
        else getattr(signals, "SIG" + sig.upper().removeprefix("SIG"), None)
    )
    if not isinstance(num, int) or not 1 <= num <= 64:
        raise InvalidArgument(f"unknown signal {sig[:40]!r}", hint="TERM, INT, KILL, HUP or 1-64")
    with connect() as c:
        c.proc_signal(name, _proc_id(proc_id), int(num))


@proc.command(name="kill")
@click.argument("name")
@click.argument("proc_id")
@fail_on_errors
def proc_kill(name: str, proc_id: str) -> None:
    """SIGKILL a background process (and its process group)."""
    with connect() as c:
        c.proc_signal(name, _proc_id(proc_id), int(signals.SIGKILL))


@proc.command(name="stdin")
@click.argument("name")
@click.argument("proc_id")
@click.option("--eof", is_flag=True, help="Close its stdin after sending.")
@fail_on_errors
def proc_stdin(name: str, proc_id: str, eof: bool) -> None:
    """Send mvmctl's stdin to a background process started with --stdin-open."""
    data = sys.stdin.buffer.read(M.MAX_BODY + 1)
    check_size(len(data))
    with connect() as c:
        c.proc_stdin(name, _proc_id(proc_id), data, eof)


@proc.command(name="wait")
@click.argument("name")
@click.argument("proc_id")
@click.option("--timeout", default="60s", show_default=True)
@fail_on_errors
def proc_wait(name: str, proc_id: str, timeout: str) -> None:
    """Wait for a background process to end; exits with its status (124 if still running)."""
    with connect() as c:
        p = c.proc_wait(name, _proc_id(proc_id), parse_duration(timeout, "timeout"))
    if p.running:
        warn(f"mvm: process {p.proc} still running after {timeout}")
        sys.exit(EXEC_TIMEOUT_EXIT)
    sys.exit(p.exit_code or 0)


@proc.command(name="output")
@click.argument("name")
@click.argument("proc_id")
@click.option("--stderr", is_flag=True, help="Show stderr instead of stdout.")
@fail_on_errors
def proc_output(name: str, proc_id: str, stderr: bool) -> None:
    """Print what a background process wrote (the last 1 MiB per stream is kept)."""
    with connect() as c:
        data = c.proc_output(name, _proc_id(proc_id), "stderr" if stderr else "stdout")
    sys.stdout.buffer.write(data)
