"""The ``mvmctl`` click group: commands from :data:`mvm.cli.main.LAZY`, imported when invoked.

Apart from :mod:`mvm.cli.main` (which has the table and the entry point, and imports no
click) so that a plain ``mvmctl exec`` can run without importing click at all.
"""

from __future__ import annotations

import importlib

import click

from mvm.cli.main import LAZY


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
