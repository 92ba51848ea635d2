"""``mvmctl fork NAME NEW [--count N]``: children of a running sandbox (an adapter over
mvmd's fork route)."""

from __future__ import annotations

import click

from mvm.cli.common import fail_on_errors


@click.command(name="fork")
@click.argument("name")
@click.argument("new")
@click.option("--count", "-n", default=1, show_default=True, help="How many children.")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def fork_command(name: str, new: str, count: int, as_json: bool) -> None:
    """Start children of running sandbox NAME with its memory, files and processes as they
    are now: NEW, or NEW-1 .. NEW-N with --count. Each is independent from then on; port
    forwards are not copied. NAME pauses only while its snapshot is written."""
    import msgspec

    from mvm import client as mvmclient

    with mvmclient.Client() as c:
        out = c.fork(name, new, count)
    if as_json:
        click.echo(msgspec.json.encode(out).decode())
        return
    for child in out.children:
        click.echo(f"{child.name}: running ({child.id})")
    click.echo(
        f"{out.source} paused {out.pause_seconds * 1000:.0f} ms; "
        f"{len(out.children)} children in {out.seconds:.2f}s",
        err=True,
    )
