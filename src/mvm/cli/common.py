"""Pieces every mvmctl command shares: error reporting and KEY=VALUE parsing."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.markup import escape

from mvm.cli.ui import err_console
from mvm.errors import InvalidArgument, MvmError
from mvm.policy.network import PRESETS as NETWORK_PRESETS

F = TypeVar("F", bound=Callable[..., Any])


def report(exc: MvmError, as_json: bool) -> None:
    """Print an error (message + hint, or a JSON object) and exit with its code."""
    if as_json:
        click.echo(json.dumps(exc.to_dict()))
    else:
        err_console.print(f"[bold red]mvm:[/] {escape(exc.message)}")
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}")
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
            err_console.print("[red]interrupted[/]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


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
    from mvm.secrets import check_name, secret_ref

    env: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    for key, value in parse_env(pairs).items():
        ref = secret_ref(value)
        if ref is None:
            env[key] = value
        else:
            check_name(ref)
            secret_env[key] = ref
    return env, secret_env


def network_options(f: F) -> F:
    """``--network-preset`` and ``--network-allow``, for ``up`` and ``run`` alike."""
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
