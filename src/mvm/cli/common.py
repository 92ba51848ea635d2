"""Pieces every mvmctl command shares: error reporting, option types, KEY=VALUE parsing.

Kept lean on purpose (click and mvm's own small modules only): every command imports it, and
``mvmctl exec`` should cost little more than Python's start and one mvmd round trip. rich,
the policy module and the client are imported where they are used.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from mvm import names
from mvm.errors import InvalidArgument, MvmError

if TYPE_CHECKING:
    from mvm.client import Client

F = TypeVar("F", bound=Callable[..., Any])
#: Exit status when a command (or a wait) ran out of time.
EXEC_TIMEOUT_EXIT = 124


def emit_json(obj: Any) -> None:
    import msgspec

    click.echo(msgspec.json.encode(obj).decode())


def connect() -> Client:
    """A client of mvmd (started on demand)."""
    from mvm.client import Client

    return Client()


def ago(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def warn(markup: str) -> None:
    """One rich-markup line on stderr (rich is imported only when there is something to say)."""
    from mvm.cli.ui import err_console

    err_console.print(markup)


def report(exc: MvmError, as_json: bool) -> None:
    """Print an error (message + hint, or a JSON object) and exit with its code."""
    if as_json:
        click.echo(json.dumps(exc.to_dict()))
    else:
        from rich.markup import escape

        warn(f"[bold red]mvm:[/] {escape(exc.message)}")
        if exc.hint:
            warn(f"[yellow]hint:[/] {escape(exc.hint)}")
    sys.exit(exc.exit_code)


def fail_on_errors(fn: F) -> F:
    """Turn MvmError into a clean message (JSON with --json) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MvmError as exc:
            report(exc, bool(kwargs.get("as_json")))
        except KeyboardInterrupt:
            warn("[red]interrupted[/]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class OctalMode(click.ParamType[int]):
    """File permissions in octal (``644``, ``0755``): an int in 0..0o7777, or a usage error."""

    name = "octal mode"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
            return value
        text = str(value)
        if not re.fullmatch(r"0?[0-7]{1,4}", text):
            self.fail(f"{text!r} is not an octal mode from 0 to 7777 (e.g. 644)", param, ctx)
        return int(text, 8)


class Seconds(click.ParamType[float]):
    """A finite number of seconds in ``[lo, hi]`` (no nan, no inf), or a usage error."""

    name = "seconds"

    def __init__(self, lo: float, hi: float = 7 * 86400.0) -> None:
        self.lo, self.hi = lo, hi

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:40]!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not self.lo <= seconds <= self.hi:
            self.fail(f"{seconds:g} is not in {self.lo:g}..{self.hi:g} seconds", param, ctx)
        return seconds


def check_name(kind: names.Kind) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: the value (or each of several) must follow ``names.check(kind)``."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        for v in value if isinstance(value, tuple) else [value]:
            if v is not None and not names.is_valid(kind, v):
                try:
                    names.check(kind, v)
                except InvalidArgument as exc:
                    raise click.BadParameter(f"{exc.message}; {exc.hint}") from None
        return value

    return callback


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise InvalidArgument(f"--env {p!r}: expected KEY=VALUE")
        env[k] = v
    return env


def split_env(pairs: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """``-e`` pairs -> (plain env, secret env ``{KEY: NAME}`` from ``KEY=secret:NAME``).

    Secret references go to mvmd by name only; it resolves them when the process starts.
    """
    env: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    for key, value in parse_env(pairs).items():
        if not value.startswith("secret:"):  # mvm.secrets (cryptography) only when needed
            env[key] = value
            continue
        from mvm.secrets import check_name, secret_ref

        ref = secret_ref(value)
        if ref is None:
            env[key] = value
        else:
            check_name(ref)
            secret_env[key] = ref
    return env, secret_env


def network_options(f: F) -> F:
    """``--network-preset`` and ``--network-allow``, for ``up`` and ``run`` alike."""
    from mvm.policy.network import PRESETS as NETWORK_PRESETS

    f = click.option(
        "--network-allow",
        "network_allow",
        multiple=True,
        metavar="HOST[:PORT]",
        help="Also allow this name (*.example.org wildcards; port default 80 and 443; repeatable).",
    )(f)
    f = click.option(
        "--network-preset",
        type=click.Choice(NETWORK_PRESETS),
        default="none",
        show_default=True,
        help="none: no network device; registries: the host's apt/pip hosts; dev: registries plus "
        "$MVM_HOME/network.toml; unrestricted: any name (never loopback, metadata, the host).",
    )(f)
    return f
