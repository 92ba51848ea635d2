"""``mvmctl secret put|ls|rm``: the local secret store (values never on argv, never printed).

These work on ``$MVM_HOME/secrets`` directly: no daemon is needed, and mvmd reads the
same store when a process it starts asks for ``-e KEY=secret:NAME``.
"""

from __future__ import annotations

import json
import sys

import click
from rich.markup import escape

from mvm.cli.common import fail_on_errors
from mvm.cli.ui import err_console
from mvm.errors import SecretError
from mvm.secrets import MAX_VALUE, SecretStore, check_name


def _read_value(name: str) -> str:
    """The value from stdin when it is not a TTY, else from a hidden, confirmed prompt."""
    if sys.stdin is not None and not sys.stdin.isatty():
        raw = sys.stdin.buffer.read(MAX_VALUE + 3)
        if len(raw) > MAX_VALUE + 2:
            raise SecretError(f"secret {name} is larger than {MAX_VALUE} bytes", name=name)
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"secret {name} is not UTF-8 text", name=name) from None
    value: str = click.prompt(
        f"value for {name}", hide_input=True, confirmation_prompt=True, err=True
    )
    return value


@click.group("secret")
def secret() -> None:
    """Encrypted secrets, injected with `-e KEY=secret:NAME` (values never on argv)."""


@secret.command("put")
@click.argument("name")
@fail_on_errors
def put(name: str) -> None:
    """Store NAME; the value comes from stdin (piped) or a hidden prompt."""
    check_name(name)
    store = SecretStore()
    existed = name in store.names()
    store.put(name, _read_value(name))
    err_console.print(f"{'replaced' if existed else 'stored'} secret [bold]{escape(name)}[/]")


@secret.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of names.")
@fail_on_errors
def ls(as_json: bool) -> None:
    """List secret names (never values)."""
    names = SecretStore().names()
    if as_json:
        click.echo(json.dumps(names))
        return
    for n in names:
        click.echo(n)


@secret.command("rm")
@click.argument("name")
@fail_on_errors
def rm(name: str) -> None:
    """Remove NAME from the store."""
    SecretStore().remove(name)
    err_console.print(f"removed secret [bold]{escape(name)}[/]")


COMMANDS = [secret]
