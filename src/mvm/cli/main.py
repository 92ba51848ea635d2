"""``mvmctl``: build images and run commands in microVMs.

Exit codes: the command's own status for ``run``; 124 when it timed out (the
VM is destroyed); 125 for an mvm error (message and hint on stderr); 126/127
when the guest could not execute / find the command; 2 for bad usage.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.markup import escape
from rich.table import Table

from mvm import doctor as doctor_mod
from mvm.agent import protocol as P
from mvm.api.models import NetworkSpec
from mvm.cli.audit import COMMANDS as AUDIT_COMMANDS
from mvm.cli.audit import write_run_receipt
from mvm.cli.browser import COMMANDS as BROWSER_COMMANDS
from mvm.cli.builder import COMMANDS as BUILDER_COMMANDS
from mvm.cli.builder import build_in_builder
from mvm.cli.code import COMMANDS as CODE_COMMANDS
from mvm.cli.common import (
    Seconds,
    check_name,
    fail_on_errors,
    network_options,
    parse_env,
    split_env,
)
from mvm.cli.desktop import COMMANDS as DESKTOP_COMMANDS
from mvm.cli.fork import fork_command
from mvm.cli.ports import COMMANDS as PORT_COMMANDS
from mvm.cli.sandboxes import COMMANDS
from mvm.cli.script import compile_command, run_mode
from mvm.cli.secrets import COMMANDS as SECRET_COMMANDS
from mvm.cli.serve import COMMANDS as SERVE_COMMANDS
from mvm.cli.ui import RichReporter, err_console, out_console, stderr_is_tty
from mvm.errors import InvalidArgument
from mvm.images import manifest as manifests
from mvm.images.store import Image, ImageStore
from mvm.oneshot import DEFAULT_TIMEOUT, TIMEOUT_EXIT, RunResult, run_once

F = TypeVar("F", bound=Callable[..., Any])
#: Largest stdin ``run -i`` forwards to the command.
MAX_STDIN = P.MAX_PAYLOAD


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvm")
def cli() -> None:
    """mvm: run untrusted code in microVMs (QEMU microvm; KVM when usable, else TCG)."""


# ---------------------------------------------------------------------------- doctor


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_on_errors
def doctor(as_json: bool) -> None:
    """Show what this host can do: QEMU, KVM or TCG, tools, kernel, images, disk."""
    checks = doctor_mod.run_checks()
    failed = any(c.status == doctor_mod.FAIL for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [c.__dict__ for c in checks]}))
    else:
        table = Table(show_header=True, header_style="bold")
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col)
        colors = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            table.add_row(
                c.name, f"[{colors[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix)
            )
        out_console().print(table)
    sys.exit(1 if failed else 0)


# ---------------------------------------------------------------------------- build


@cli.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", help=f"Build a preset ({', '.join(manifests.preset_names())}).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if a cached image matches.")
@click.option("--json", "as_json", is_flag=True, help="Print the image record as JSON.")
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Build a Dockerfile (the common subset) in the builder VM; DIRECTORY is the context.",
)
@click.option(
    "--oci",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Import an OCI image layout or docker save archive (tar) in the builder VM.",
)
@click.option("--name", help="Image name (for --oci and -f).")
@click.option("--locked", is_flag=True, help="Install exactly the versions in mvm.lock.")
@fail_on_errors
def build(
    directory: Path | None,
    preset: str | None,
    rebuild: bool,
    as_json: bool,
    dockerfile: Path | None,
    oci: Path | None,
    name: str | None,
    locked: bool,
) -> None:
    """Build (or reuse) an image from a preset or a directory with mvm.toml.

    With neither, builds the default preset (python). A Dockerfile (-f), an OCI archive
    (--oci) or an mvm.toml with a [build] table is built inside the builder VM.
    """
    if directory is not None and preset is not None:
        raise InvalidArgument("give a DIRECTORY or --preset, not both")
    built = build_in_builder(directory, dockerfile, oci, name, locked, as_json)
    if built is not None:
        _print_image(built, as_json)
        return
    if directory is not None:
        m = manifests.load_dir(directory)
    else:
        m = manifests.load_preset(preset or manifests.DEFAULT_IMAGE)
    with RichReporter(enabled=stderr_is_tty() and not as_json) as rep:
        img = ImageStore().build(m, reporter=rep, rebuild=rebuild)
    _print_image(img, as_json)


def _print_image(img: Image, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode(img).decode())
    else:
        aliases = f" (aliases: {', '.join(img.aliases)})" if img.aliases else ""
        click.echo(
            f"{img.name}{aliases}  {img.id[:12]}  kernel {img.kernel_release}  "
            f"rootfs {img.rootfs_bytes >> 20} MiB"
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@fail_on_errors
def images(as_json: bool) -> None:
    """List built images."""
    imgs = ImageStore().all()
    if as_json:
        click.echo(json.dumps([msgspec.to_builtins(i) for i in imgs]))
        return
    for i in imgs:
        aliases = ",".join(i.aliases) or "-"
        click.echo(
            f"{i.name:<16} {i.id[:12]}  aliases={aliases:<16} {i.manifest.suite:<9} "
            f"{i.rootfs_bytes >> 20} MiB"
        )


# ---------------------------------------------------------------------------- run


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--image",
    default=manifests.DEFAULT_IMAGE,
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
    with RichReporter(enabled=stderr_is_tty() and not as_json) as rep:
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
        write_run_receipt(receipt_file, list(command), keys, result, policy)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        if result.truncated_stdout or result.truncated_stderr:
            err_console.print(
                f"[yellow]mvm: output truncated at {P.DEFAULT_OUTPUT_LIMIT} bytes per stream[/]"
            )
        if result.timed_out:
            err_console.print(
                f"[bold red]mvm:[/] command timed out after {timeout:g}s; the VM was destroyed"
            )
    sys.exit(TIMEOUT_EXIT if result.timed_out else result.exit_code)


for _command in [
    *COMMANDS,
    *AUDIT_COMMANDS,
    *BUILDER_COMMANDS,
    *SECRET_COMMANDS,
    *PORT_COMMANDS,
    *CODE_COMMANDS,
    *SERVE_COMMANDS,
    *BROWSER_COMMANDS,
    *DESKTOP_COMMANDS,
]:
    cli.add_command(_command)
cli.add_command(compile_command)
cli.add_command(fork_command)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="mvmctl")


if __name__ == "__main__":
    main()
