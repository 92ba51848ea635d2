"""Issue 11.5: every ``mvmctl`` command given hostile values answers with one clear error
line and a non-zero exit, never a traceback.

The commands run in-process (click's CliRunner) against a real mvmd in an empty home:
no images, no sandboxes, so a request that gets through the client reaches mvmd and is
answered there (not found, invalid), and nothing can boot or build. ``up`` and ``run``
always get an invalid ``--image`` for that reason (the rest of their options vary).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
        ["fs", "write", a, b, "--mode", c],
        ["fs", "read", a, b],
        ["fs", "ls", a, b],
        ["fs", "stat", a, b],
        ["fs", "mkdir", a, b],
        ["fs", "rm", a, b],
        ["fs", "mv", a, b, c],
        ["cp", f"{a}:{b}", c or "x"],
        ["proc", "start", a, "-e", b, "--", c or "x"],
        ["proc", "ls", a],
        ["proc", "signal", a, b, c],
        ["proc", "kill", a, b],
        ["proc", "stdin", a, b],
        ["proc", "wait", a, b, "--timeout", c],
        ["proc", "output", a, b],
        ["logs", a, "--since", b],
        ["wait", a, "--timeout", b],
        ["set-ttl", a, b],
        ["pause", a],
        ["resume", a],
        ["snapshot", "save", a, b],
        ["snapshot", "ls", a],
        ["snapshot", "restore", a, b],
        ["snapshot", "rm", a, b],
        ["down", a, b],
        ["forward", a, b],
        ["forward", a, "--remove", b],
        ["forward", a, "--host", b, c],
        ["secret", "rm", a],
        ["audit", "show", a],
        ["audit", "ls", "-n", a],
        ["up", "--image", BAD_IMAGE, "--name", a, "--ttl", b, "-p", c, "--cpus", d],
        ["up", "--image", BAD_IMAGE, "--memory", a, "--disk", b, "-e", c],
        ["run", "--image", BAD_IMAGE, "--timeout", a, "--cpus", b, "--", c or "x"],
        ["run", "--image", a, "--memory", b, "--", "true"],
    ]


N_COMMANDS = len(commands(["x"] * 4))


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
    env = {"MVM_HOME": str(home), "MVM_RUN_DIR": str(home / "run"), "COLUMNS": "80"}
    r = runner.invoke(cli, args, env=env, input="data", catch_exceptions=True)
    shown = f"mvmctl {args!r} -> {r.exit_code}\n{r.output[-2000:]}"
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{shown}\n{r.exception!r}"
    assert "Traceback" not in r.output, shown
    if r.exit_code == 0:
        assert allow_ok, shown
        return 0
    errors = [ln for ln in r.output.splitlines() if ln.startswith(("mvm:", "Error:"))]
    assert len(errors) == 1, shown
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) <= 4, shown
    return r.exit_code


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(which=st.integers(0, N_COMMANDS - 1), values=st.lists(VALUE, min_size=4, max_size=4))
def test_every_command_fails_cleanly_on_hostile_values(
    empty_home: Path, which: int, values: list[str]
) -> None:
    args = commands(values)[which]
    # With no sandbox anywhere, only these can succeed on a lucky draw.
    benign = args[:2] in (["audit", "ls"], ["secret", "rm"]) or args[0] == "cp"
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
    ],
    ids=lambda a: " ".join(a)[:30],
)
def test_the_reported_cases_are_one_line_errors(empty_home: Path, args: list[str]) -> None:
    """All refused as invalid (exit 2) before anything is sent: on main these printed
    tracebacks, reached other sandboxes' URLs, or sent nan to mvmd."""
    assert check(empty_home, args) == 2
