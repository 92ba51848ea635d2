"""``mvmctl desktop``: desktop sandboxes for computer-use agents (a thin adapter over
``mvm.DesktopSandbox``: parse, call, print)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mvm.cli.common import fail_on_errors
from mvm.cli.ui import out_console
from mvm.sdk.desktop import DesktopSandbox


def parse_resolution(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not (w.isdecimal() and h.isdecimal()) or len(w) > 5 or len(h) > 5:
        raise click.BadParameter(f"{text!r} is not WIDTHxHEIGHT", param_hint="--resolution")
    return int(w), int(h)


def _connect(name: str) -> DesktopSandbox:
    sb = DesktopSandbox.connect(name)
    assert isinstance(sb, DesktopSandbox)
    return sb


@click.group()
def desktop() -> None:
    """Desktop sandboxes: an X display with input, screenshots and a noVNC viewer."""


@desktop.command("up")
@click.argument("name")
@click.option("--allow", multiple=True, metavar="HOST[:PORT]", help="A site it may reach.")
@click.option("--ttl", default="30m", show_default=True)
@click.option(
    "--resolution", default="1024x768", show_default=True, metavar="WxH", help="Screen size."
)
@fail_on_errors
def up(name: str, allow: tuple[str, ...], ttl: str, resolution: str) -> None:
    """Start desktop sandbox NAME."""
    sb = DesktopSandbox.create(parse_resolution(resolution), allow=list(allow), name=name, ttl=ttl)
    w, h = sb.get_screen_size()
    out_console().print(f"{sb.name} is up ({w}x{h}); viewer: mvmctl desktop view {sb.name}")


@desktop.command("screenshot")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@fail_on_errors
def screenshot(name: str, output: Path) -> None:
    """Write a PNG of NAME's screen to -o FILE."""
    png = _connect(name).screenshot()
    output.write_bytes(png)
    out_console().print(f"wrote {output} ({len(png)} bytes)")


@desktop.command("click")
@click.argument("name")
@click.argument("x", type=int)
@click.argument("y", type=int)
@click.option("--button", type=click.Choice(["left", "right", "middle", "double"]), default="left")
@fail_on_errors
def click_(name: str, x: int, y: int, button: str) -> None:
    """Click at X Y on NAME's screen."""
    sb = _connect(name)
    {
        "left": sb.left_click,
        "right": sb.right_click,
        "middle": sb.middle_click,
        "double": sb.double_click,
    }[button](x, y)


@desktop.command("type")
@click.argument("name")
@click.argument("text")
@fail_on_errors
def type_(name: str, text: str) -> None:
    """Type TEXT into the focused window of NAME."""
    _connect(name).write(text)


@desktop.command("view")
@click.argument("name")
@fail_on_errors
def view(name: str) -> None:
    """Start NAME's noVNC viewer on 127.0.0.1 and print its URL (with the session password)."""
    click.echo(_connect(name).stream.start())


@desktop.command("clipboard")
@click.argument("name")
@click.option("--set", "text", metavar="TEXT", help="Put TEXT on the clipboard ('-': stdin).")
@fail_on_errors
def clipboard(name: str, text: str | None) -> None:
    """Print NAME's clipboard text, or set it with --set."""
    sb = _connect(name)
    if text is None:
        click.echo(sb.clipboard.read(), nl=False)
    else:
        data = sys.stdin.read() if text == "-" else text
        sb.clipboard.write(data)


COMMANDS = [desktop]
