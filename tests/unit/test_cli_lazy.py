"""The lean CLI: commands are imported only when invoked, the ``--help`` table matches the
real commands, and the hot commands (exec, ls, fs, proc) do not import the SDK, httpx, rich's
progress machinery or the VM code. Checked in a fresh interpreter (``sys.modules`` of this
one is full of everything the other tests imported)."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from mvm.cli import main as cli_main
from mvm.cli.up import PROJECT_PRESETS
from mvm.project import PRESETS

#: Modules that a command talking to mvmd has no use for.
HEAVY = (
    "httpx",
    "ssl",
    "mvm.sdk.sandbox",
    "mvm.sdk.browser",
    "mvm.service",
    "mvm.vm",
    "mvm.images.store",
    "mvm.images.manifest",
    "mvm.policy.admission",
    "mvm.audit",
    "cryptography",
    "rich.progress",
    "rich.console",
    "asyncio",
)


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("name", sorted(cli_main.LAZY))
def test_table_matches_the_command(name: str) -> None:
    cmd = cli_main.load(name)
    assert cmd.name == name
    stub = click.Command(name, help=cli_main.LAZY[name][1])
    for limit in (30, 45, 74, 200):
        assert stub.get_short_help_str(limit) == cmd.get_short_help_str(limit), limit


def test_help_imports_no_command() -> None:
    mods = modules_after(
        "import sys\nfrom mvm.cli.main import cli\n"
        "try:\n    cli(['--help'], prog_name='mvmctl')\nexcept SystemExit:\n    pass"
    )
    assert not {m for m in mods if m.startswith("mvm.cli.")} - {"mvm.cli.main", "mvm.cli.group"}
    assert not mods & set(HEAVY)


#: What the click-free ``mvmctl exec`` must not import (tests/integration/test_cli_fastexec.py
#: checks a real one; here: the entry module and the planning of a plain exec).
NOT_ON_EXEC = ("click", "msgspec", "mvm.api.models", "mvm.client", "rich", "typing", "pathlib")


def test_entry_and_exec_plan_import_no_click() -> None:
    mods = modules_after(
        "import os, tempfile\nos.environ['MVM_HOME'] = tempfile.mkdtemp()\n"
        "import mvm.cli.main\nfrom mvm.cli.fastexec import plan\n"
        "assert plan(['sb', '-e', 'A=1', '--timeout', '300s', '--', 'true']) is not None"
    )
    assert not mods & set(NOT_ON_EXEC), sorted(mods & set(NOT_ON_EXEC))


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--help"],
        ["ls", "--help"],
        ["fs", "write", "--help"],
        ["proc", "start", "--help"],
        ["daemon", "status", "--help"],
    ],
)
def test_hot_commands_import_nothing_heavy(argv: list[str]) -> None:
    mods = modules_after(
        "from mvm.cli.main import cli\nimport mvm.client\n"
        f"try:\n    cli({argv!r}, prog_name='mvmctl')\nexcept SystemExit:\n    pass"
    )
    assert "mvm.client" in mods
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_unknown_command_is_a_usage_error() -> None:
    from click.testing import CliRunner

    r = CliRunner().invoke(cli_main.cli, ["no-such-command"])
    assert r.exit_code == 2 and "No such command" in r.output


def test_init_presets_are_the_projects() -> None:
    assert tuple(sorted(PRESETS)) == PROJECT_PRESETS


def test_mvm_and_sdk_are_lazy() -> None:
    mods = modules_after("import mvm, mvm.sdk")
    assert "mvm.sdk.sandbox" not in mods and "httpx" not in mods
    mods = modules_after("import mvm\nmvm.Sandbox")
    assert "mvm.sdk.sandbox" in mods


def test_plain_env_does_not_load_the_secret_store() -> None:
    mods = modules_after(
        "from mvm.cli.common import split_env\nassert split_env(('A=1', 'B=x')) == "
        "({'A': '1', 'B': 'x'}, {})"
    )
    assert "mvm.secrets" not in mods and "cryptography" not in mods
    mods = modules_after(
        "from mvm.cli.common import split_env\nassert split_env(('A=secret:k',)) == ({}, {'A': 'k'})"
    )
    assert "mvm.secrets" in mods
