"""``mvmctl forward``: host ports relayed to guest ports through mvmd (no guest NIC needed)."""

from __future__ import annotations

import click
import msgspec

from mvm.api import models as M
from mvm.cli.common import connect, fail_on_errors
from mvm.errors import InvalidArgument


def parse_mapping(text: str) -> tuple[int, int]:
    """``HOST_PORT:GUEST_PORT`` or ``GUEST_PORT`` (any free host port) -> (host, guest). Pure."""
    parts = text.strip().split(":")
    if len(parts) not in (1, 2) or not all(p.isdecimal() and len(p) <= 5 for p in parts):
        raise InvalidArgument(
            f"bad port mapping {text!r}",
            hint="use HOST_PORT:GUEST_PORT (e.g. 8080:8000), or GUEST_PORT for any free host port",
        )
    nums = [int(p) for p in parts]
    host_port, guest_port = (0, nums[0]) if len(nums) == 1 else (nums[0], nums[1])
    if not 1 <= guest_port <= 65535:
        raise InvalidArgument(f"guest port {guest_port} is not in 1-65535", hint="e.g. 8080:8000")
    if not 0 <= host_port <= 65535:
        raise InvalidArgument(
            f"host port {host_port} is not in 0-65535", hint="0 or no host port: any free port"
        )
    return host_port, guest_port


def port_specs(mappings: tuple[str, ...], host: str = "127.0.0.1") -> list[M.PortSpec]:
    """``-p`` values of ``up`` as PortSpecs bound to ``host``."""
    out = []
    for m in mappings:
        host_port, guest_port = parse_mapping(m)
        out.append(M.PortSpec(guest_port=guest_port, host_port=host_port, host=host))
    return out


def describe(f: M.ForwardInfo) -> str:
    host = f"[{f.host}]" if ":" in f.host else f.host
    return f"{host}:{f.host_port}->{f.guest_port}"


@click.command()
@click.argument("name")
@click.argument("mapping", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Host address to bind.")
@click.option(
    "--allow-wildcard",
    is_flag=True,
    help="Allow binding 0.0.0.0 / :: (reachable from other machines; audited).",
)
@click.option("--list", "list_", is_flag=True, help="List the sandbox's forwards.")
@click.option("--remove", "remove", metavar="ID", help="Remove the forward with this id.")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def forward(
    name: str,
    mapping: str | None,
    host: str,
    allow_wildcard: bool,
    list_: bool,
    remove: str | None,
    as_json: bool,
) -> None:
    """Forward a host port to a port in sandbox NAME: MAPPING is HOST_PORT:GUEST_PORT,
    or GUEST_PORT alone for any free host port. Binds 127.0.0.1 unless --host says otherwise.

    \b
    mvmctl forward web 8080:8000          # http://127.0.0.1:8080 -> port 8000 in web
    mvmctl forward web --list
    mvmctl forward web --remove fw-1a2b3c4d
    """
    if sum((mapping is not None, list_, remove is not None)) != 1:
        raise InvalidArgument(
            "give exactly one of HOST_PORT:GUEST_PORT, --list or --remove ID",
            hint="e.g. mvmctl forward NAME 8080:8000",
        )
    with connect() as c:
        if list_:
            items = c.forwards(name)
            if as_json:
                click.echo(msgspec.json.encode(items).decode())
                return
            from rich.table import Table

            from mvm.cli.ui import out_console

            table = Table(box=None, header_style="bold")
            for col in ("ID", "HOST", "HOST PORT", "GUEST PORT"):
                table.add_column(col)
            for f in items:
                table.add_row(f.id, f.host, str(f.host_port), str(f.guest_port))
            out_console().print(table)
            return
        if remove is not None:
            gone = c.unforward(name, remove)
            if as_json:
                click.echo(msgspec.json.encode(gone).decode())
            else:
                click.echo(f"removed {gone.id}  {describe(gone)}")
            return
        assert mapping is not None
        host_port, guest_port = parse_mapping(mapping)
        spec = M.PortSpec(
            guest_port=guest_port, host_port=host_port, host=host, allow_wildcard=allow_wildcard
        )
        info = c.forward(name, spec)
    if as_json:
        click.echo(msgspec.json.encode(info).decode())
    else:
        click.echo(f"{info.id}  {describe(info)}  ({name})")


COMMANDS = [forward]
