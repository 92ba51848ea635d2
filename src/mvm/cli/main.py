"""``mvmctl``: build images and run commands in microVMs.

Exit codes: the command's own status for ``run``; 124 when it timed out (the
VM is destroyed); 125 for an mvm error (message and hint on stderr); 126/127
when the guest could not execute / find the command; 2 for bad usage.

Commands are registered by name and imported only when invoked (:class:`LazyGroup`): a
command pays for its own modules, not for every other command's (``mvmctl exec`` imports
neither the SDK, nor rich, nor the VM code). ``--help`` lists them from the table below;
tests/unit/test_cli_lazy.py checks the table against the real commands.
"""

from __future__ import annotations

import importlib
import os

import click

#: name -> ("module:attribute", short help). Sorted by name, as ``--help`` shows them.
LAZY: dict[str, tuple[str, str]] = {
    "audit": (
        "mvm.cli.audit:audit",
        "Read and verify the audit log (hash-chained, signed by this host's key).",
    ),
    "browser": (
        "mvm.cli.browser:browser",
        "Browser sandboxes: Chromium in a microVM, CDP on a host port, pages only from --allow.",
    ),
    "build": (
        "mvm.cli.images:build",
        "Build (or reuse) an image from a preset or a directory with mvm.toml.",
    ),
    "builder": (
        "mvm.cli.builder:builder",
        "The builder VM: where every image except its own is built.",
    ),
    "cluster": (
        "mvm.cli.cluster:cluster",
        "Many hosts on Ray: placement, failover, migration (docs/cluster.md).",
    ),
    "compile": (
        "mvm.cli.script:compile_command",
        "Record SCRIPT (no VM starts) into DIR/ir.json plus included files by hash.",
    ),
    "cp": (
        "mvm.cli.files:cp",
        "Copy a file between the host and a sandbox: cp ./f NAME:/work/ or cp NAME:/work/f .",
    ),
    "daemon": (
        "mvm.cli.daemon:daemon",
        "mvmd, the host daemon (normally started on demand by any command).",
    ),
    "desktop": (
        "mvm.cli.desktop:desktop",
        "Desktop sandboxes: an X display with input, screenshots and a noVNC viewer.",
    ),
    "doctor": (
        "mvm.cli.images:doctor",
        "Show what this host can do: QEMU, KVM or TCG, tools, kernel, images, disk.",
    ),
    "down": (
        "mvm.cli.sandboxes:down",
        "Stop and remove sandboxes (their snapshots are kept).",
    ),
    "exec": (
        "mvm.cli.execute:exec_",
        "Run COMMAND in sandbox NAME; streams output and exits with its status.",
    ),
    "fork": (
        "mvm.cli.fork:fork_command",
        "Start children of running sandbox NAME with its memory, files and processes as they "
        "are now: NEW, or NEW-1 ..",
    ),
    "forward": (
        "mvm.cli.ports:forward",
        "Forward a host port to a port in sandbox NAME: MAPPING is HOST_PORT:GUEST_PORT, or "
        "GUEST_PORT alone for any free host port.",
    ),
    "fs": (
        "mvm.cli.files:fs",
        "Files in a sandbox: write, read, ls, stat, mkdir, rm, mv.",
    ),
    "images": ("mvm.cli.images:images", "List built images."),
    "init": (
        "mvm.cli.up:init",
        "Write a project (mvm.toml + example files) into DIRECTORY.",
    ),
    "logs": (
        "mvm.cli.sandboxes:logs",
        "Console and background-process output of a sandbox.",
    ),
    "ls": (
        "mvm.cli.sandboxes:ls",
        "List sandboxes: name, id, image, state, age, TTL left, cpus/memory.",
    ),
    "mcp": (
        "mvm.cli.code:mcp",
        "Serve mvm as MCP tools (stdio by default) for agents: sandboxes, run_code, commands, "
        "files, ports.",
    ),
    "migrate": (
        "mvm.cli.cluster:migrate",
        "Move running sandbox NAME to host TO (a cluster front: MVM_URL + MVM_TOKEN); its "
        "memory, files and processes go with it, the name stays.",
    ),
    "pause": ("mvm.cli.sandboxes:pause", "Freeze a sandbox's vCPUs (it keeps its memory)."),
    "proc": (
        "mvm.cli.procs:proc",
        "Background processes: start, ls, signal, stdin, wait, kill, output.",
    ),
    "receipt": (
        "mvm.cli.audit:receipt_group",
        "Check receipts written by `mvmctl run --receipt FILE`.",
    ),
    "resume": ("mvm.cli.sandboxes:resume", "Continue a paused sandbox."),
    "run": (
        "mvm.cli.run:run",
        "Run COMMAND in a fresh microVM, then destroy it (one-shot; nothing persists).",
    ),
    "run-code": (
        "mvm.cli.code:run_code",
        "Run a cell in sandbox NAME's persistent interpreter (variables, imports and the working "
        "directory survive between calls).",
    ),
    "secret": (
        "mvm.cli.secrets:secret",
        "Encrypted secrets, injected with `-e KEY=secret:NAME` (values never on argv).",
    ),
    "serve": (
        "mvm.cli.serve:serve",
        "Serve the mvm API (and the E2B-compatible face) over TCP; every request needs a token.",
    ),
    "set-ttl": ("mvm.cli.sandboxes:set_ttl", "Give a sandbox TTL more time from now (e.g."),
    "snapshot": (
        "mvm.cli.snapshots:snapshot",
        "Save, list, restore and remove snapshots (memory, devices and the writable layer).",
    ),
    "token": (
        "mvm.cli.serve:token",
        "API tokens for `mvmctl serve` (shown once, stored only as hashes).",
    ),
    "up": (
        "mvm.cli.up:up",
        "Start a named sandbox (from a project DIRECTORY, or an --image) and leave it running.",
    ),
    "wait": ("mvm.cli.sandboxes:wait", "Wait until the sandbox stops (TTL, down, or failure)."),
}


def load(name: str) -> click.Command:
    """Import the command registered as ``name`` (its module, then the attribute)."""
    module, _, attr = LAZY[name][0].partition(":")
    cmd = getattr(importlib.import_module(module), attr)
    if not isinstance(cmd, click.Command):
        raise TypeError(f"{LAZY[name][0]} is not a click command")
    return cmd


class LazyGroup(click.Group):
    """A group whose commands (from :data:`LAZY`) are imported when first invoked; ``--help``
    prints the table's short help without importing any of them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*LAZY, *self.commands})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A NUL cannot come through exec(2), but can through the SDK's in-process use or
        # a test runner; click.Path would pass it to os.stat (ValueError, a traceback).
        if any("\x00" in a for a in args):
            raise click.UsageError("arguments cannot contain NUL bytes", ctx)
        return super().parse_args(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY:
            self.add_command(load(cmd_name), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit)))
            else:
                stub = click.Command(name, help=LAZY[name][1])  # the help text only, not imported
                rows.append((name, stub.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvm")
def cli() -> None:
    """mvm: run untrusted code in microVMs (QEMU microvm; KVM when usable, else TCG)."""


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="mvmctl")


if __name__ == "__main__":
    main()
