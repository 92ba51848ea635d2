"""Issue 11.5: every ``mvmctl`` command given hostile values answers with one clear error
line and a non-zero exit, never a traceback.

The commands run in-process (click's CliRunner) against a real mvmd in an empty home:
no images, no sandboxes, so a request that gets through the client reaches mvmd and is
answered there (not found, invalid), and nothing can boot or build. ``up`` and ``run``
always get an invalid ``--image`` for that reason (the rest of their options vary).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.cli.main import cli
from mvm.fsutil import remove_tree
from tests.integration.mvmd_home import Ctl, daemon_pids, wait_until

pytestmark = [pytest.mark.timeout(300)]

SPECIAL = [
    "",
    " ",
    "..",
    "../x",
    "x/../victim",
    "p2?x=1",
    "a#b",
    "%2e%2e",
    "a\x01b",
    "\x1b[31m",
    "-1",
    "-0",
    "0",
    "999",
    "9" * 40,
    "1e400",
    "nan",
    "inf",
    "-inf",
    "0x10",
    "\u0663",  # an Arabic-Indic digit: isdigit() says yes, int() agrees, a port would too
    "1_000",
    "a" * 300,
    "/",
    "//",
    "/work/../../etc",
    "\u202e",
    "fw-zzzzzzzz",
    "KEY",
    "=v",
    "K=secret:../../x",
    "0:0",
    "99999:1",
    "1:99999",
]
#: Hostile values: the report's list, then anything (NUL and control characters included).
VALUE = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=24))
#: An image name no rule accepts, so ``up``/``run`` can never boot or build anything.
BAD_IMAGE = "../no/such image"


def commands(v: list[str]) -> list[list[str]]:
    """Every command with hostile values in its slots (``v``: at least 4 drawn values)."""
    a, b, c, d = v[:4]
    return [
        ["exec", a, "--", "true"],
        ["exec", "--timeout", a, "--cwd", b, "--user", c, "-e", d, "x", "--", "true"],
        ["exec", a, "--", b or "x", c, d],
        ["exec", "--detach", "--json", a, "--", "true"],
        ["fs", "write", a, b, "--mode", c],
        ["fs", "read", a, b],
        ["fs", "ls", a, b],
        ["fs", "stat", a, b],
        ["fs", "mkdir", "--parents", a, b],
        ["fs", "rm", "-r", a, b],
        ["fs", "mv", a, b, c],
        ["cp", f"{a}:{b}", c or "x"],
        ["cp", a or "x", f"{b}:{c}"],
        ["proc", "start", a, "-e", b, "--cwd", c, "--user", d, "--", "x"],
        ["proc", "start", "--stdin-open", a, "--", b or "x", c],
        ["proc", "ls", a],
        ["proc", "signal", a, b, c],
        ["proc", "kill", a, b],
        ["proc", "stdin", "--eof", a, b],
        ["proc", "wait", a, b, "--timeout", c],
        ["proc", "output", "--stderr", a, b],
        ["logs", a, "--since", b],
        ["logs", "--follow", a, "--since", b],
        ["wait", a, "--timeout", b],
        ["set-ttl", a, b],
        ["pause", a],
        ["resume", a],
        ["snapshot", "save", a, b],
        ["snapshot", "ls", a],
        ["snapshot", "restore", a, b],
        ["snapshot", "restore", a, b, "--as", c],
        ["snapshot", "rm", a, b],
        ["fork", a, b, "--count", c],
        ["down", a, b],
        ["forward", a, b],
        ["forward", a, "--list"],
        ["forward", a, "--remove", b],
        ["forward", a, "--host", b, c],
        ["secret", "put", a],
        ["secret", "rm", a],
        ["token", "create", "--tenant", a, "--ttl", b, "--scope", "sandboxes"],
        ["token", "revoke", a],
        ["audit", "show", a],
        ["audit", "tail", "-n", a],
        ["audit", "verify", "--json", "--path", a],
        ["receipt", "verify", a, "--pubkey", b],
        ["run-code", a, "--code", b, "--context", c, "--timeout", d],
        ["run-code", a, "--language", b, "--file", c],
        ["browser", "up", a, "--allow", b, "--ttl", c, "--image", BAD_IMAGE],
        ["browser", "up", "x", "--memory", a, "--image", BAD_IMAGE],
        ["browser", "cdp", a],
        ["browser", "screenshot", a, b, "-o", "shot.png"],
        ["desktop", "click", a, b, c, "--button", d],
        ["desktop", "clipboard", a, "--text", b],
        ["desktop", "type", a, b],
        ["desktop", "screenshot", a, "-o", "shot.png"],
        ["desktop", "view", a],
        ["migrate", a, "--to", b],
        ["builder", "logs", a],
        ["builder", "down", a],
        ["cluster", "rejoin", a],
        ["init", a, "--preset", b],
        ["compile", a, "--out", b],
        ["up", "--image", BAD_IMAGE, "--name", a, "--ttl", b, "-p", c, "--cpus", d],
        ["up", "--image", BAD_IMAGE, "--memory", a, "--disk", b, "-e", c],
        ["up", "--image", BAD_IMAGE, "--network-preset", a, "--network-allow", b],
        ["run", "--image", BAD_IMAGE, "--timeout", a, "--cpus", b, "--", c or "x"],
        ["run", "--image", BAD_IMAGE, "-e", a, "--cwd", b, "--user", c, "--", "true"],
        ["run", "--image", BAD_IMAGE, "--network-allow", a, "--receipt", b, "--", "true"],
        ["run", "--image", a, "--memory", b, "--", "true"],
    ]


#: Commands the hypothesis test does not drive, and why. Everything else must appear in
#: ``commands`` (``test_every_command_is_driven_or_exempt_with_a_reason`` checks).
NO_VALUES = "no parameter that takes a value"
EXEMPT = {
    "builder status": NO_VALUES,
    "builder up": "a lucky draw (--idle, --allow) boots a builder VM: a VM per example",
    "cluster down": NO_VALUES,
    "cluster status": NO_VALUES,
    "daemon start": NO_VALUES,
    "daemon status": NO_VALUES,
    "daemon stop": NO_VALUES,
    "doctor": NO_VALUES,
    "images": NO_VALUES,
    "ls": NO_VALUES,
    "secret ls": NO_VALUES,
    "token ls": NO_VALUES,
    "audit checkpoint": "its one value is an output file path (a lucky draw writes anywhere)",
    "build": "a lucky draw (`.`, a preset) builds an image: minutes, and the network",
    "desktop up": "no --image to make invalid: a lucky draw builds and boots a desktop",
    "cluster up": "starts Ray and host daemons (a server, not a command that ends)",
    "cluster join": "runs `ray start` against the drawn address",
    "serve": "a server: runs until stopped",
    "mcp": "a server: runs until stopped",
}


N_COMMANDS = len(commands(["x"] * 4))
#: With no sandbox anywhere, only these can succeed on a lucky draw (they act on the
#: home's own stores, or on a file the draw names).
BENIGN = (
    ["audit", "tail"],
    ["audit", "show"],
    ["audit", "verify"],
    ["secret", "put"],
    ["secret", "rm"],
    ["token", "create"],
)


@pytest.fixture(scope="module")
def empty_home() -> Iterator[Path]:
    """An MVM_HOME with nothing in it; mvmd started there, stopped (and gone) at the end."""
    home = Path(tempfile.mkdtemp(prefix="mvm-hostile-", dir="/tmp"))
    ctl = Ctl(home)
    ctl.ok("daemon", "start", timeout=60)
    try:
        yield home
    finally:
        try:
            ctl("daemon", "stop", timeout=30)
        except subprocess.TimeoutExpired:
            pass
        wait_until(lambda: not daemon_pids(home), 10)
        for pid in daemon_pids(home):  # started for this home only
            os.kill(pid, 9)
        remove_tree(home)


def check(home: Path, args: list[str], allow_ok: bool = False) -> int:
    """Run ``mvmctl args``: no traceback, and unless ``allow_ok`` a non-zero exit with one
    error line (``mvm:`` or click's ``Error:``). Returns the exit code."""
    runner = CliRunner()
    env = {
        "MVM_HOME": str(home),
        "MVM_RUN_DIR": str(home / "run"),
        "COLUMNS": "80",
        "MVM_SECRETS_KEYRING": "0",
    }
    with tempfile.TemporaryDirectory(dir=home) as cwd, contextlib.chdir(cwd):  # for `init`, `cp`
        r = runner.invoke(cli, args, env=env, input="data", catch_exceptions=True)
    shown = f"mvmctl {args!r} -> {r.exit_code}\n{r.output[-2000:]}"
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{shown}\n{r.exception!r}"
    assert "Traceback" not in r.output, shown
    if r.exit_code == 0:
        assert allow_ok, shown
        return 0
    errors = [ln for ln in r.output.splitlines() if ln.startswith(("mvm:", "Error:"))]
    if "--json" in args and not errors:  # the error is one JSON object on one line
        errors = [ln for ln in r.output.splitlines() if ln.startswith('{"error": ')]
    assert len(errors) == 1, shown
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) <= 4, shown
    return r.exit_code


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(which=st.integers(0, N_COMMANDS - 1), values=st.lists(VALUE, min_size=4, max_size=4))
def test_every_command_fails_cleanly_on_hostile_values(
    empty_home: Path, which: int, values: list[str]
) -> None:
    args = commands(values)[which]
    benign = args[0] in ("cp", "init") or args[:2] in BENIGN
    check(empty_home, args, allow_ok=benign)


@pytest.mark.parametrize(
    "args",
    [
        ["fs", "write", "x", "/work/x", "--mode", "999"],
        ["exec", "a\x01b", "--", "true"],
        ["exec", "nothere/../victim", "--", "true"],
        ["down", "nothere/../victim"],
        ["exec", "x", "--", "echo", *["a" * 100_000] * 6],
        ["proc", "start", "x", "--", "echo", *["a" * 100_000] * 6],
        ["exec", "x", "--", "echo", "a" * (128 * 1024)],
        ["proc", "signal", "x", "1", "\u0663"],
        ["logs", "x", "--since", "nan"],
        ["run", "--timeout", "nan", "--", "true"],
        ["compile", "", "--out", "\x00"],  # found by the hypothesis test: click.Path + NUL
    ],
    ids=lambda a: " ".join(a)[:30],
)
def test_the_reported_cases_are_one_line_errors(empty_home: Path, args: list[str]) -> None:
    """All refused as invalid (exit 2) before anything is sent: on main these printed
    tracebacks, reached other sandboxes' URLs, or sent nan to mvmd."""
    assert check(empty_home, args) == 2


def leaf_commands() -> list[str]:
    """Every runnable ``mvmctl`` command, as its words (``"proc start"``)."""
    ctx = click.Context(cli)

    def walk(cmd: click.Command, path: list[str]) -> Iterator[str]:
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                found = cmd.get_command(ctx, sub)
                assert found is not None, sub
                yield from walk(found, [*path, sub])
        else:
            yield " ".join(path)

    return sorted(walk(cli, []))


def test_every_command_is_driven_or_exempt_with_a_reason() -> None:
    """A new command (or one dropped from ``commands``) fails here until it is driven with
    hostile values or exempted with its reason."""
    driven = set()
    for args in commands(["v"] * 4):
        words = [w for w in args if not w.startswith("-")]
        for n in (2, 1):
            if " ".join(words[:n]) in leaf_commands():
                driven.add(" ".join(words[:n]))
                break
        else:
            raise AssertionError(f"{args} names no command")
    missing = set(leaf_commands()) - driven - set(EXEMPT)
    assert not missing, f"commands with no hostile-value test and no reason: {sorted(missing)}"
    assert not driven & set(EXEMPT), driven & set(EXEMPT)
