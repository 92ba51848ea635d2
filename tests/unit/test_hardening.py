"""Pure parts of the issue 11 fixes: URL segments, command sizes, cgroup limits, CLI types."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import Any

import click
import pytest

from mvm import client
from mvm.agent import protocol as P
from mvm.agent.client import command_frame
from mvm.agent.guest import base
from mvm.agent.guest import cgroups as CG
from mvm.agent.guest import spawning as S
from mvm.cli.common import OctalMode, Seconds
from mvm.errors import InvalidArgument


@pytest.mark.parametrize(
    "name", ["nothere/../victim", "zzz/../p2", "p2?x=1", "a\x01b", "", "..", "a#b", "%2e", "A"]
)
def test_a_bad_sandbox_name_never_becomes_a_url_segment(name: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        client.seg("sandbox", name)
    assert ei.value.exit_code == 2


def test_a_good_name_is_its_own_segment() -> None:
    assert client.seg("sandbox", "p2") == "p2"
    assert client.seg("forward", "fw-0123abcd") == "fw-0123abcd"
    assert client.num(7) == "7"
    with pytest.raises(InvalidArgument):
        client.num(-1)


def test_command_spec_names_the_limits() -> None:
    with pytest.raises(ValueError, match=str(P.MAX_ARG)):
        P.command_spec(["echo", "a" * (P.MAX_ARG + 1)], {}, None)
    with pytest.raises(ValueError, match=str(P.MAX_ARG)):
        P.command_spec(["true"], {"K": "v" * P.MAX_ARG}, None)
    with pytest.raises(ValueError, match="512 KiB"):
        P.command_spec(["echo", *["a" * 100_000] * 6], {}, None)
    with pytest.raises(ValueError, match="NUL"):
        P.command_spec(["echo", "a\x00b"], {}, None)
    with pytest.raises(ValueError, match="empty"):
        P.command_spec([], {}, None)
    assert json.loads(P.command_spec(["a"], {"K": "v"}, "/w")) == {
        "argv": ["a"],
        "env": {"K": "v"},
        "cwd": "/w",
    }


def test_a_large_command_travels_in_the_payload_and_the_agent_unpacks_it() -> None:
    small, payload = command_frame(["echo", "hi"], None, None, b"in")
    assert small == {"argv": ["echo", "hi"], "env": {}} and payload == b"in"
    big = "a" * 100_000
    header, payload = command_frame(["echo", big], {"K": "v"}, "/work", b"stdin")
    assert set(header) == {"spec"}
    assert len(P.encode({"t": P.EXEC, "id": 1, **header}, payload)) < P.MAX_BODY
    h, rest = base.with_spec({"t": P.EXEC, **header}, payload)
    assert (h["argv"], h["env"], h["cwd"], rest) == (["echo", big], {"K": "v"}, "/work", b"stdin")
    with pytest.raises(InvalidArgument, match="1024 KiB"):
        command_frame(["echo", big], None, None, b"x" * P.MAX_PAYLOAD)


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ({"spec": 10}, b"short"),
        ({"spec": 5}, b"[1,2]"),
        ({"spec": 2}, b"{}"[:1] + b"x"),
        ({"spec": 11}, b'{"user":"r"}'),
        ({"spec": -1}, b""),
        ({"spec": P.MAX_SPEC + 1}, b""),
    ],
)
def test_the_agent_refuses_a_bad_spec(header: dict[str, Any], payload: bytes) -> None:
    with pytest.raises(base.RequestError) as ei:
        base.with_spec(header, payload)
    assert ei.value.code == P.E_BAD_REQUEST


def test_argv_echoed_back_is_bounded() -> None:
    shown = S.short_argv(["x" * 100_000] * 200)
    assert len(shown) <= 64
    assert len(json.dumps(shown)) <= 17 * 1024
    assert S.short_argv(["a", "b"]) == ["a", "b"]
    assert len(json.dumps(S.short_argv(["\u00e9" * 256] * 64))) <= 17 * 1024


def test_cgroup_limits_are_checked() -> None:
    assert CG.check_limits({"pids_max": 40, "memory_pct": 50}) == {
        "pids_max": 40,
        "memory_pct": 50,
    }
    assert CG.check_limits({}) == {}
    for bad in (
        {"pids_max": 0},
        {"pids_max": True},
        {"memory_pct": 101},
        {"memory_pct": "5"},
        {"other": 1},
        [],
    ):
        with pytest.raises(ValueError):
            CG.check_limits(bad)


def test_without_cgroups_the_agent_says_so_and_uses_process_groups() -> None:
    cg = CG.Cgroups(root="/nonexistent-mvm-test-root/cgroup")
    assert not cg.ok
    group = cg.group("exec")
    assert group.path is None
    assert cg.describe().startswith("unavailable")


@pytest.mark.parametrize(
    ("typ", "good", "bad"),
    [
        (OctalMode(), {"644": 0o644, "0755": 0o755, "7777": 0o7777, "0": 0}, ["999", "8", "", "-1", "17777", "0x1"]),
        (Seconds(0.1), {"1": 1.0, "0.5": 0.5}, ["nan", "inf", "-1", "0", "1e400", "", "x"]),
    ],
)  # fmt: skip
def test_cli_types_parse_or_fail_as_usage_errors(
    typ: click.ParamType[Any], good: dict[str, Any], bad: list[str]
) -> None:
    for text, value in good.items():
        assert typ.convert(text, None, None) == value
    for text in bad:
        with pytest.raises(click.BadParameter):
            typ.convert(text, None, None)


def test_a_gated_command_is_moved_before_it_runs(tmp_path: Path) -> None:
    """The gate: the command's pid is in the group's cgroup.procs (here a plain file)
    before it runs, and it is the command itself (exec replaced the shell)."""
    group = CG.Group(str(tmp_path))
    (tmp_path / "cgroup.procs").write_text("")
    me = pwd.getpwuid(os.getuid()).pw_name
    proc = S.spawn({"argv": ["sh", "-c", "echo $$; ls /proc/self/fd | wc -l"], "user": me}, group)
    out, _ = proc.communicate(timeout=30)
    pid, nfds = out.decode().split()
    assert int(pid) == proc.pid
    assert (tmp_path / "cgroup.procs").read_text() == str(proc.pid)
    assert int(nfds) <= 5  # stdin, stdout, stderr, ls's own dir fd: nothing of the agent's
    assert group.pgid == proc.pid
    cat = S.spawn({"argv": ["cat"], "user": me}, group)
    assert cat.communicate(b"line one\nrest", timeout=30)[0] == b"line one\nrest"
    with pytest.raises(S.SpawnError) as ei:
        S.spawn({"argv": ["no-such-command-mvm"], "user": me}, group)
    assert ei.value.exit_code == 127
    plain = tmp_path / "not-executable"
    plain.write_text("data")
    plain.chmod(0o644)
    with pytest.raises(S.SpawnError) as ei:
        S.spawn({"argv": [str(plain)], "user": me}, group)
    assert ei.value.exit_code == 126


def test_check_runnable_refuses_what_execve_would(tmp_path: Path) -> None:
    """Behind the spawn gate a shell runs the command; a file execve refuses (ENOEXEC: an
    executable text file without #!) must still be 126, not run as a shell script."""
    text = tmp_path / "hostname"
    text.write_text("vm\n")
    text.chmod(0o755)
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o755)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    for bad in (str(text), str(fifo), str(tmp_path)):
        with pytest.raises(S.SpawnError) as e:
            S.check_runnable(bad, path, "/")
        assert e.value.exit_code == 126, bad
    with pytest.raises(S.SpawnError) as e:
        S.check_runnable(str(tmp_path / "missing"), path, "/")
    assert e.value.exit_code == 127
    with pytest.raises(S.SpawnError) as e:
        S.check_runnable("no-such-command-xyz", path, "/")
    assert e.value.exit_code == 127
    S.check_runnable(str(script), path, "/")  # a script
    S.check_runnable("true", path, "/")  # an ELF binary found on PATH
