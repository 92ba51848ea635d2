"""``mvmctl browser``: browser sandboxes (Chromium kept warm, driven over CDP from the host).

A thin adapter over ``mvm.BrowserSandbox``: parse, call, print.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mvm.cli.common import fail_on_errors
from mvm.cli.ui import out_console
from mvm.errors import InvalidArgument
from mvm.sdk.browser import DEFAULT_MEMORY_MB, BrowserSandbox
from mvm.sdk.options import resources


@click.group()
def browser() -> None:
    """Browser sandboxes: Chromium in a microVM, CDP on a host port, pages only from --allow."""


@browser.command("up")
@click.argument("name")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="HOST[:PORT]",
    help="A site pages may load from (repeatable; none: no network at all).",
)
@click.option("--ttl", default="30m", show_default=True, help="Lifetime: 90s, 30m, 1h...")
@click.option("--memory", type=click.IntRange(512, 16384), default=DEFAULT_MEMORY_MB)
@click.option("--image", default="browser", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def up(name: str, allow: tuple[str, ...], ttl: str, memory: int, image: str, as_json: bool) -> None:
    """Start browser sandbox NAME and print its CDP URL.

    \b
    mvmctl browser up web --allow example.org
    """
    sb = BrowserSandbox.create(
        list(allow), name=name, ttl=ttl, image=image, resources=resources(memory_mb=memory)
    )
    url = sb.cdp_url
    if as_json:
        click.echo(json.dumps({"name": sb.name, "id": sb.id, "cdp_url": url}))
    else:
        out_console().print(f"{sb.name} is up; CDP: {url}")


@browser.command("cdp")
@click.argument("name")
@fail_on_errors
def cdp(name: str) -> None:
    """Print the CDP WebSocket URL of browser sandbox NAME (for connect_over_cdp)."""
    sb = BrowserSandbox.connect(name)
    assert isinstance(sb, BrowserSandbox)
    click.echo(sb.cdp_url)


@browser.command("screenshot")
@click.argument("name")
@click.argument("url")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--full-page", is_flag=True, help="The whole page, not just the viewport.")
@fail_on_errors
def screenshot(name: str, url: str, output: Path, full_page: bool) -> None:
    """Load URL in a fresh tab of sandbox NAME and write a PNG of it to -o FILE."""
    if not url:
        raise InvalidArgument("URL is empty")
    sb = BrowserSandbox.connect(name)
    assert isinstance(sb, BrowserSandbox)
    png = sb.screenshot(url, full_page=full_page)
    output.write_bytes(png)
    out_console().print(f"wrote {output} ({len(png)} bytes)")


COMMANDS = [browser]
