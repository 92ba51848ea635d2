"""``mvmctl daemon start|stop|status``: mvmd, the host daemon."""

from __future__ import annotations

import json
import sys
import time

import click
import msgspec

from mvm.cli.common import connect, fail_on_errors


@click.group()
def daemon() -> None:
    """mvmd, the host daemon (normally started on demand by any command)."""


@daemon.command(name="start")
@fail_on_errors
def daemon_start() -> None:
    with connect() as c:
        c.ensure_daemon()
        st = c.status()
    click.echo(f"mvmd running (pid {st.pid}) on {st.socket}")


@daemon.command(name="stop")
@fail_on_errors
def daemon_stop() -> None:
    """Stop mvmd. Sandboxes keep running; the next mvmd reattaches to them."""
    from mvm.client import Client

    c = Client(autostart=False)
    st = c.ping()
    if st is None:
        click.echo("mvmd is not running")
        return
    c.shutdown()
    deadline = time.monotonic() + 10
    while c.ping() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    click.echo(f"mvmd stopped (pid {st.pid})")


@daemon.command(name="status")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def daemon_status(as_json: bool) -> None:
    from mvm.client import Client

    st = Client(autostart=False).ping()
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(st) if st else {"running": False}))
    elif st is None:
        click.echo("mvmd is not running")
    else:
        click.echo(f"mvmd {st.version} pid {st.pid}, {st.sandboxes} sandboxes, socket {st.socket}")
        if st.pool.get("size"):
            p = st.pool
            click.echo(
                f"pool: {p.get('idle', 0)} waiting VMs ({p.get('idle_mb', 0)} MiB) over "
                f"{p.get('shapes', 0)} shapes, {p.get('size')} per shape, "
                f"{p.get('handed_out', 0)} handed out" + (", pre-warmed" if p.get("warm") else "")
            )
    sys.exit(0 if st else 1)
