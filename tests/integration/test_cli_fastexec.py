"""The click-free ``mvmctl exec`` (mvm.cli.fastexec) against a real mvmd and VM: what it
prints and exits with is what the click command (mvm.cli.execute, run in-process through
``cli``) prints and exits with, for output, exit statuses, stdin, env/cwd/user, a timeout,
a missing sandbox and mvmd not running (started on demand); and it imports neither click
nor msgspec nor the client."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mvmd_home import MVMCTL, Ctl, private_home

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

#: ``mvmctl`` through click only (the group, as before the fast path).
CLICK = [sys.executable, "-c", "import sys\nfrom mvm.cli.main import cli\ncli(prog_name='mvmctl')"]
#: Loaded by the fast path only when something is wrong (or never).
SLOW_MODULES = {"click", "msgspec", "mvm.api.models", "mvm.client", "rich", "typing"}


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvfx-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    return Ctl(home)


@pytest.fixture(scope="module")
def sb(ctl: Ctl) -> str:
    ctl.ok("up", "--image", "python", "--name", "fx", "--ttl", "1h", timeout=300)
    return "fx"


def both(ctl: Ctl, *args: str, input: bytes | None = None) -> tuple[tuple[int, bytes, bytes], ...]:
    """(exit status, stdout, stderr) of ``mvmctl exec ARGS`` by the fast path, then by click."""
    out = []
    for argv in (MVMCTL, CLICK):
        p = subprocess.run(
            [*argv, "exec", *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            env=ctl.env,
            check=False,
        )
        out.append((p.returncode, p.stdout, p.stderr))
    return tuple(out)


def test_missing_sandbox_is_the_same_error(ctl: Ctl) -> None:
    fast, slow = both(ctl, "nosuch", "--", "true")
    assert fast == slow
    assert fast[0] == 125 and b"no sandbox named 'nosuch'" in fast[2]


def test_mvmd_not_running_is_started_on_demand() -> None:
    with private_home("mvfy-") as h:  # its own home: no mvmd there yet
        ctl = Ctl(h)
        assert not (h / "mvmd.sock").exists()
        r = ctl("exec", "nosuch", "--", "true")
        assert r.rc == 125 and "no sandbox named 'nosuch'" in r.err, str(r)
        assert (h / "mvmd.sock").exists()


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["--", "sh", "-c", "echo out; echo err >&2; exit 3"], None),
        (["--", "true"], None),
        (["--", "no-such-command"], None),
        (["-e", "A=1", "--cwd", "/tmp", "--user", "root", "--", "sh", "-c", "echo $A; pwd; id -u"], None),
        (["-i", "--", "sh", "-c", "cat; kill -9 $$"], b"in\x00put\n"),
        (["--timeout", "1", "--", "sleep", "30"], None),
        (["--", "sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"], None),
    ],
)  # fmt: skip
def test_same_output_and_status_as_click(
    ctl: Ctl, sb: str, args: list[str], stdin: bytes | None
) -> None:
    fast, slow = both(ctl, sb, *args, input=stdin)
    assert fast == slow


def test_imports_neither_click_nor_msgspec(ctl: Ctl, sb: str, tmp_path: Path) -> None:
    dump = tmp_path / "modules"
    code = (
        "import sys, atexit\n"
        f"atexit.register(lambda: open({str(dump)!r}, 'w').write(repr(sorted(sys.modules))))\n"
        "from mvm.cli.main import main\n"
        f"sys.argv = ['mvmctl', 'exec', {sb!r}, '--', 'sh', '-c', 'echo hi']\n"
        "main()\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, env=ctl.env, check=False
    )
    assert (p.returncode, p.stdout) == (0, b"hi\n"), p.stderr
    mods = set(ast.literal_eval(dump.read_text()))
    assert "mvm.cli.fastexec" in mods
    assert not mods & SLOW_MODULES, sorted(mods & SLOW_MODULES)
