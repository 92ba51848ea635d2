"""``mvmctl snapshot ...``: save, list, restore (in place or as a new sandbox), remove."""

from __future__ import annotations

import click

from mvm.cli.common import ago, connect, emit_json, fail_on_errors, warn


@click.group()
def snapshot() -> None:
    """Save, list, restore and remove snapshots (memory, devices and the writable layer)."""


@snapshot.command(name="save")
@click.argument("name")
@click.argument("snap")
@fail_on_errors
def snapshot_save(name: str, snap: str) -> None:
    with connect() as c:
        s = c.snapshot_save(name, snap)
    click.echo(f"{s.sandbox}/{s.name}: {s.size >> 20} MiB")


@snapshot.command(name="ls")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def snapshot_ls(name: str, as_json: bool) -> None:
    with connect() as c:
        snaps = c.snapshot_list(name)
    if as_json:
        emit_json(snaps)
        return
    for s in snaps:
        click.echo(f"{s.name:<20} {s.size >> 20:>6} MiB  {ago(s.created)} ago  {s.image}")


@snapshot.command(name="restore")
@click.argument("name")
@click.argument("snap")
@click.option("--as", "as_name", default=None, help="Start it as a new sandbox of this name.")
@fail_on_errors
def snapshot_restore(name: str, snap: str, as_name: str | None) -> None:
    """Put NAME back to SNAP (recreating the sandbox if it was removed), or with --as NEW
    start SNAP as a new sandbox NEW and leave NAME alone."""
    with connect() as c:
        if as_name is not None:
            s = c.snapshot_restore_as(name, snap, as_name)
        else:
            s = c.snapshot_restore(name, snap)
    click.echo(f"{s.name}: restored {snap} ({s.state})")
    for w in s.warnings:
        warn(f"[yellow]mvm:[/] {w}")


@snapshot.command(name="rm")
@click.argument("name")
@click.argument("snap")
@fail_on_errors
def snapshot_rm(name: str, snap: str) -> None:
    with connect() as c:
        c.snapshot_remove(name, snap)
