"""``mvmctl token create|ls|revoke`` and ``mvmctl serve``: the API over TCP, behind tokens.

Thin: tokens live in :mod:`mvm.tokens`, the server in :mod:`mvm.serve`.
"""

from __future__ import annotations

import json
import time

import click
from rich.markup import escape

from mvm import names
from mvm.cli.common import fail_on_errors
from mvm.cli.ui import err_console
from mvm.durations import parse_duration
from mvm.tokens import SCOPES, TokenRecord, TokenStore


def _token_json(rec: TokenRecord) -> dict[str, object]:
    return {
        "id": rec.id,
        "tenant": rec.tenant,
        "created": rec.created,
        "expires_at": rec.expires_at,
        "scopes": rec.scopes,
        "revoked": rec.revoked,
        "active": rec.active(),
    }


@click.group("token")
def token() -> None:
    """API tokens for `mvmctl serve` (shown once, stored only as hashes)."""


@token.command("create")
@click.option("--tenant", required=True, help="Tenant the token speaks for.")
@click.option("--ttl", default=None, help="Lifetime (e.g. 30d, 12h); default: no expiry.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(list(SCOPES)),
    help="What it may do (repeatable; default sandboxes + e2b).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_on_errors
def create(tenant: str, ttl: str | None, scopes: tuple[str, ...], as_json: bool) -> None:
    """Create a token for TENANT and print it once."""
    names.check("tenant", tenant)
    seconds = parse_duration(ttl, "ttl") if ttl is not None else None
    plain, rec = TokenStore().create(tenant, ttl=seconds, scopes=list(scopes) or None)
    if as_json:
        click.echo(json.dumps({**_token_json(rec), "token": plain}))
        return
    click.echo(plain)
    err_console.print(
        f"token [bold]{rec.id}[/] for tenant [bold]{escape(tenant)}[/]: "
        "shown once; store it now (only its hash is kept)"
    )


@token.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@fail_on_errors
def ls(as_json: bool) -> None:
    """List tokens (ids, tenants, expiry; never the tokens)."""
    recs = TokenStore().list()
    if as_json:
        click.echo(json.dumps([_token_json(r) for r in recs]))
        return
    for r in recs:
        state = "revoked" if r.revoked else ("active" if r.active() else "expired")
        exp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.expires_at)) if r.expires_at else "-"
        click.echo(f"{r.id}\t{r.tenant}\t{state}\t{exp}\t{','.join(r.scopes)}")


@token.command("revoke")
@click.argument("token_id")
@fail_on_errors
def revoke(token_id: str) -> None:
    """Revoke TOKEN_ID at once (requests with it get 401)."""
    rec = TokenStore().revoke(names.check("token", token_id))
    err_console.print(f"revoked token [bold]{rec.id}[/]")


@click.command("serve")
@click.option("--listen", default="127.0.0.1:3000", show_default=True, help="HOST:PORT.")
@click.option("--allow-wildcard", is_flag=True, help="Allow 0.0.0.0 / :: (audited).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="PEM cert.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="PEM key.")
@fail_on_errors
def serve(listen: str, allow_wildcard: bool, tls_cert: str | None, tls_key: str | None) -> None:
    """Serve the mvm API (and the E2B-compatible face) over TCP; every request needs a token."""
    from mvm.serve.app import run_server

    run_server(listen, allow_wildcard=allow_wildcard, tls_cert=tls_cert, tls_key=tls_key)


COMMANDS = [token, serve]
