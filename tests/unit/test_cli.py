"""mvmctl argument handling. Nothing here boots a VM or builds an image: run_once and
ImageStore are replaced by fakes that fail the test if the CLI gets that far by mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mvm.cli import images as cli_images
from mvm.cli import main as cli_main
from mvm.cli import run as cli_run
from mvm.cli.common import parse_env
from mvm.errors import InvalidArgument
from mvm.oneshot import RunResult


class Forbidden:
    """Stands in for ImageStore: any use is a test failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the CLI tried to open the image store")


class FakeRun:
    """Replaces run_once: records its arguments and returns a canned result."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.result = fake_result()

    def set_result(self, **kw: Any) -> None:
        self.result = fake_result(**kw)

    def __len__(self) -> int:
        return len(self.seen)

    async def __call__(self, argv: list[str], **kwargs: Any) -> RunResult:
        self.seen.append({"argv": argv, **kwargs})
        on_output = kwargs.get("on_output")
        if on_output is not None:
            on_output("stdout", self.result.stdout)
            on_output("stderr", self.result.stderr)
        return self.result


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    """run_once is faked and ImageStore forbidden: no VM, no image build, ever."""
    fake = FakeRun()
    monkeypatch.setattr(cli_run, "run_once", fake)
    monkeypatch.setattr(cli_images, "ImageStore", Forbidden)
    return fake


def fake_result(**kw: Any) -> RunResult:
    base: dict[str, Any] = {
        "sandbox_id": "sb-1",
        "image": "python-3.11",
        "exit_code": 0,
        "stdout": b"out\n",
        "stderr": b"err\n",
        "duration": 0.5,
        "boot_seconds": 0.2,
        "timed_out": False,
        "truncated_stdout": False,
        "truncated_stderr": False,
    }
    base.update(kw)
    return RunResult(**base)


def invoke(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(cli_main.cli, list(args), input=stdin, prog_name="mvmctl")


# --------------------------------------------------------------------------- parse_env


def test_parse_env() -> None:
    """KEY=VALUE pairs; the value may be empty or contain '='; later keys win."""
    assert parse_env(()) == {}
    assert parse_env(("A=1", "B=", "C=x=y", "A=2")) == {"A": "2", "B": "", "C": "x=y"}


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value", ""])
def test_parse_env_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="KEY=VALUE") as info:
        parse_env(("OK=1", bad))
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- usage errors


def test_run_without_command_asks_for_the_images_cmd(calls: FakeRun) -> None:
    """No COMMAND: the run gets an empty argv, which the service fills with the image's
    recorded CMD (or refuses before booting: test_builder_runconfig)."""
    r = invoke("run", "--image", "app")
    assert r.exit_code == 0, r.output
    assert calls.seen[0]["argv"] == [] and calls.seen[0]["image"] == "app"


def test_run_bad_env_exits_2(calls: FakeRun) -> None:
    """A malformed --env is refused before any VM is started."""
    r = invoke("run", "--env", "BAD", "--", "true")
    assert r.exit_code == 2
    assert "expected KEY=VALUE" in r.output
    assert len(calls) == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--cpus", "0"],
        ["--cpus", "17"],
        ["--memory", "64"],
        ["--memory", "99999"],
        ["--timeout", "0"],
        ["--timeout", "soon"],
        ["--bogus-option"],
    ],
)
def test_run_option_ranges(calls: FakeRun, args: list[str]) -> None:
    """Out-of-range resources and unknown options are usage errors (exit 2)."""
    r = invoke("run", *args, "--", "true")
    assert r.exit_code == 2, r.output
    assert len(calls) == 0


def test_run_interactive_stdin_too_large(calls: FakeRun) -> None:
    r = invoke("run", "-i", "--", "cat", stdin=b"x" * (cli_run.MAX_STDIN + 1))
    assert r.exit_code == 2
    assert "stdin is larger" in r.output
    assert len(calls) == 0


def test_build_dir_and_preset_conflict(calls: FakeRun, tmp_path: Path) -> None:
    """build DIR --preset X is InvalidArgument (exit 2) before anything is built."""
    r = invoke("build", str(tmp_path), "--preset", "python")
    assert r.exit_code == 2
    assert "not both" in r.output


def test_build_unknown_preset(calls: FakeRun) -> None:
    """An unknown preset is an mvm error (125) with the list of presets as the hint."""
    r = invoke("build", "--preset", "cobol")
    assert r.exit_code == 125
    assert "unknown preset" in r.output and "minimal" in r.output


def test_build_dir_without_manifest(calls: FakeRun, tmp_path: Path) -> None:
    r = invoke("build", str(tmp_path))
    assert r.exit_code == 125
    assert "mvm.toml" in r.output


def test_build_json_error(calls: FakeRun) -> None:
    """--json errors are one JSON object with the error class, message and hint."""
    r = invoke("build", "--preset", "cobol", "--json")
    assert r.exit_code == 125
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["error"] == "UnknownPreset" and doc["preset"] == "cobol" and doc["hint"]


def test_help_and_version() -> None:
    r = invoke("--help")
    assert r.exit_code == 0 and "run" in r.output and "build" in r.output
    assert invoke("run", "-h").exit_code == 0
    v = invoke("--version")
    assert v.exit_code == 0 and "version" in v.output


# --------------------------------------------------------------------------- run (faked)


def test_run_passes_arguments(calls: FakeRun) -> None:
    """Options reach run_once unchanged; the command's exit code is mvmctl's."""
    calls.set_result(exit_code=3)
    r = invoke(
        "run", "--image", "minimal", "--cpus", "2", "--memory", "256", "--timeout", "7",
        "-e", "A=1", "--env", "B=2", "--cwd", "/tmp", "--user", "root", "--", "ls", "-l",
    )  # fmt: skip
    assert r.exit_code == 3, r.output
    (c,) = calls.seen
    assert c["argv"] == ["ls", "-l"]
    assert (c["image"], c["cpus"], c["memory_mb"], c["timeout"]) == ("minimal", 2, 256, 7.0)
    assert c["env"] == {"A": "1", "B": "2"}
    assert (c["cwd"], c["user"], c["stdin"]) == ("/tmp", "root", b"")
    assert r.stdout == "out\n"


def test_run_forwards_stdin(calls: FakeRun) -> None:
    invoke("run", "-i", "--", "cat", stdin=b"data")
    assert calls.seen[0]["stdin"] == b"data"


def test_run_timeout_exit_124(calls: FakeRun) -> None:
    calls.set_result(exit_code=137, timed_out=True)
    r = invoke("run", "--timeout", "1", "--", "sleep", "9")
    assert r.exit_code == 124
    assert "timed out" in r.output


def test_run_json(calls: FakeRun) -> None:
    """--json prints one object and suppresses streaming output."""
    calls.set_result(exit_code=1, stdout=b"\xffx", truncated_stdout=True)
    r = invoke("run", "--json", "--", "false")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and doc["stdout"] == "\ufffdx" and doc["stderr"] == "err\n"
    assert doc["truncated"] == {"stdout": True, "stderr": False}
    assert doc["sandbox_id"] == "sb-1"
    assert calls.seen[0]["on_output"] is None


def test_build_allow_is_refused_where_nothing_runs_in_the_builder(tmp_path: Path) -> None:
    r = invoke("build", "--preset", "minimal", "--allow", "x.example")
    assert r.exit_code == 2 and "--allow applies to builds in the builder" in r.output, r.output
    (tmp_path / "a.tar").write_bytes(b"")
    r = invoke("build", "--oci", str(tmp_path / "a.tar"), "--name", "a", "--allow", "x.example")
    assert r.exit_code == 2 and "an OCI import makes no connection" in r.output, r.output
