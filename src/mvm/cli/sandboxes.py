"""Named-sandbox commands of mvmctl: ls, logs, wait, set-ttl, pause, resume, down. They talk
to mvmd (started on demand). init/up, exec, fs/cp, proc, snapshot and daemon have their own
modules, so that a command imports only what it uses."""

from __future__ import annotations

import math
import sys
import time

import click

from mvm.cli.common import (
    ago,
    connect,
    emit_json,
    fail_on_errors,
)
from mvm.cli.ports import describe as describe_forward
from mvm.durations import parse_duration
from mvm.errors import InvalidArgument


@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def ls(as_json: bool) -> None:
    """List sandboxes: name, id, image, state, age, TTL left, cpus/memory."""
    with connect() as c:
        items = c.list_sandboxes()
    if as_json:
        emit_json(items)
        return
    from rich.table import Table

    from mvm.cli.ui import out_console

    table = Table(box=None, header_style="bold")
    cols: tuple[str, ...] = (
        "NAME", "ID", "IMAGE", "STATE", "AGE", "TTL LEFT", "CPUS", "MEMORY", "DISK", "NETWORK",
        "PORTS",
    )  # fmt: skip
    clustered = any(s.host for s in items)
    if clustered:
        cols = (*cols, "HOST")
    for col in cols:
        table.add_column(col)
    for s in items:
        state = s.state + (f" ({s.reason[:40]})" if s.reason else "")
        if s.unresponsive:
            state = f"{s.state}, unresponsive ({s.unresponsive[:40]})"
        table.add_row(
            s.name,
            s.id,
            s.image,
            state,
            ago(s.created),
            f"{s.ttl_left:.0f}s",
            str(s.cpus),
            f"{s.memory_mb}M",
            f"{s.disk_mb}M",
            s.network.preset + (f"+{len(s.network.allow)}" if s.network.allow else ""),
            ",".join(describe_forward(f) for f in s.forwards) or "-",
            *((s.host or "-",) if clustered else ()),
        )
    out_console().print(table)


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True)
@click.option("--since", help="Only newer lines: a duration (10m) or a Unix time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@fail_on_errors
def logs(name: str, follow: bool, since: str | None, as_json: bool) -> None:
    """Console and background-process output of a sandbox."""
    since_ts = None
    if since is not None:
        try:
            since_ts = float(since)
        except ValueError:
            since_ts = time.time() - parse_duration(since, "--since")
        if not math.isfinite(since_ts) or since_ts < 0:
            raise InvalidArgument(f"invalid --since: {since[:40]!r}")
    with connect() as c:
        try:
            for ev in c.logs(name, follow=follow, since=since_ts):
                if as_json:
                    emit_json(ev)
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev.timestamp))
                    click.echo(f"{stamp} {ev.stream:<16} {ev.message}")
        except KeyboardInterrupt:
            pass


@click.command()
@click.argument("name")
@click.option("--timeout", default="1h", show_default=True)
@fail_on_errors
def wait(name: str, timeout: str) -> None:
    """Wait until the sandbox stops (TTL, down, or failure).

    Exits 0 when it stopped, 124 when --timeout passed first (like ``proc wait``)."""
    with connect() as c:
        s = c.wait(name, parse_duration(timeout, "timeout"))
    click.echo(f"{s.name}: {s.state}" + (f" ({s.reason})" if s.reason else ""))
    if s.state in ("running", "paused", "creating"):
        sys.exit(124)


@click.command(name="set-ttl")
@click.argument("name")
@click.argument("ttl")
@fail_on_errors
def set_ttl(name: str, ttl: str) -> None:
    """Give a sandbox TTL more time from now (e.g. 1h)."""
    with connect() as c:
        s = c.set_ttl(name, parse_duration(ttl, "ttl"))
    click.echo(f"{s.name}: {s.ttl_left:.0f}s left")


@click.command()
@click.argument("name")
@fail_on_errors
def pause(name: str) -> None:
    """Freeze a sandbox's vCPUs (it keeps its memory)."""
    with connect() as c:
        click.echo(f"{c.pause(name).name}: paused")


@click.command()
@click.argument("name")
@fail_on_errors
def resume(name: str) -> None:
    """Continue a paused sandbox."""
    with connect() as c:
        click.echo(f"{c.resume(name).name}: running")


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every sandbox.")
@fail_on_errors
def down(names: tuple[str, ...], all_: bool) -> None:
    """Stop and remove sandboxes (their snapshots are kept)."""
    if not names and not all_:
        raise InvalidArgument("name a sandbox, or pass --all")
    with connect() as c:
        targets = [s.name for s in c.list_sandboxes()] if all_ else list(names)
        for n in targets:
            c.down(n)
            click.echo(f"{n}: removed")
