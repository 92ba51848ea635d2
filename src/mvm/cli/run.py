"""``mvmctl run``: one command in a fresh microVM, booted in this process (no mvmd), then
destroyed. Also the entry of ``--mode plan|live`` for SDK scripts and compiled IR."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import click

from mvm.agent import protocol as P
from mvm.api.models import NetworkSpec
from mvm.cli.common import (
    Seconds,
    check_name,
    fail_on_errors,
    network_options,
    parse_env,
    split_env,
    warn,
)
from mvm.errors import InvalidArgument
from mvm.images.manifest import DEFAULT_IMAGE
from mvm.oneshot import DEFAULT_TIMEOUT, TIMEOUT_EXIT, RunResult, run_once
from mvm.progress import NullReporter, Reporter

#: Largest stdin ``run -i`` forwards to the command.
MAX_STDIN = P.MAX_PAYLOAD


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--image",
    default=DEFAULT_IMAGE,
    show_default=True,
    help="Image name.",
    callback=check_name("image"),
)
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--memory",
    default=512,
    show_default=True,
    type=click.IntRange(128, 16384),
    help="Guest memory in MiB.",
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=Seconds(0.1),
    help="Seconds the command may run; then it is killed, the VM destroyed, exit 124.",
)
@click.option(
    "-e", "--env", "env", multiple=True, help="KEY=VALUE or KEY=secret:NAME (repeatable)."
)
@click.option("--cwd", help="Working directory in the guest (default: the image's, else /work).")
@click.option(
    "--user",
    help="Guest user (default: the image's, else the unprivileged 'user'; 'root' allowed).",
)
@click.option("-i", "--interactive", is_flag=True, help=f"Forward stdin (up to {MAX_STDIN} bytes).")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (exit_code, stdout, stderr, duration, truncated, sandbox_id, audit_id).",
)
@click.option(
    "--receipt",
    "receipt_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a signed receipt (hashes of argv and output, env keys, image, policy) to FILE.",
)
@click.option(
    "--mode",
    "sdk_mode",
    type=click.Choice(["plan", "live"]),
    help="Run an SDK script (plan: record it, print the plan and admission; live: perform "
    "it) or replay a compiled IR dir (live). Takes SCRIPT or DIR instead of COMMAND.",
)
@network_options
@click.argument("command", nargs=-1)
@fail_on_errors
def run(
    image: str,
    cpus: int,
    memory: int,
    timeout: float,
    env: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    interactive: bool,
    as_json: bool,
    receipt_file: Path | None,
    sdk_mode: str | None,
    network_preset: str,
    network_allow: tuple[str, ...],
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a fresh microVM, then destroy it (one-shot; nothing persists).

    \b
    Example: mvmctl run --timeout 10 -- python3 -c 'print(2 + 2)'
    With no COMMAND, runs the image's recorded CMD (images built from a Dockerfile or OCI).
    SDK scripts: mvmctl run --mode plan ./script.py | --mode live ./script.py | --mode live DIR
    """
    if sdk_mode is not None:
        if len(command) != 1:
            raise InvalidArgument("--mode takes one SCRIPT or IR DIR, not a command")
        from mvm.cli.script import run_mode

        sys.exit(run_mode(sdk_mode, command[0], as_json))
    stdin = b""
    if interactive:
        stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
        if len(stdin) > MAX_STDIN:
            raise InvalidArgument(f"stdin is larger than {MAX_STDIN} bytes")

    def on_output(stream: str, data: bytes) -> None:
        out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        out.write(data)
        out.flush()

    plain_env, secret_env = split_env(env)
    network = NetworkSpec(preset=network_preset, allow=list(network_allow))
    rep_cm: contextlib.AbstractContextManager[Reporter]
    if sys.stderr.isatty() and not as_json:  # rich only when it would draw something
        from mvm.cli.ui import RichReporter

        rep_cm = RichReporter()
    else:
        rep_cm = contextlib.nullcontext(NullReporter())
    with rep_cm as rep:
        result: RunResult = asyncio.run(
            run_once(
                list(command),
                image=image,
                cpus=cpus,
                memory_mb=memory,
                timeout=timeout,
                env=plain_env,
                secret_env=secret_env,
                cwd=cwd,
                user=user,
                stdin=stdin,
                on_output=None if as_json else on_output,
                reporter=rep,
                network=network,
            )
        )
    if receipt_file is not None:
        policy: dict[str, object] = {
            "network": network.preset,
            "network_allow": list(network.allow),
            "cpus": cpus,
            "memory_mb": memory,
            "timeout": timeout,
        }
        policy |= {"user": user, "cwd": cwd}
        keys = sorted(parse_env(env))
        from mvm.cli.audit import write_run_receipt

        write_run_receipt(receipt_file, list(command), keys, result, policy)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        if result.truncated_stdout or result.truncated_stderr:
            warn(f"[yellow]mvm: output truncated at {P.DEFAULT_OUTPUT_LIMIT} bytes per stream[/]")
        if result.timed_out:
            warn(f"[bold red]mvm:[/] command timed out after {timeout:g}s; the VM was destroyed")
    sys.exit(TIMEOUT_EXIT if result.timed_out else result.exit_code)
