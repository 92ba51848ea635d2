"""The click-free ``mvmctl exec`` (mvm.cli.fastexec): it takes a command line only when it
means what click makes of it, declines everything else (click then answers: help, errors),
checks names as mvm.names does and finds mvmd's socket where the client does."""

from __future__ import annotations

import itertools
import os

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm import names
from mvm.cli import fastexec
from mvm.cli.execute import exec_


def click_params(args: list[str]) -> dict[str, object] | None:
    """What click gives ``exec_`` for ``args`` (None: a usage error or --help)."""
    try:
        ctx = exec_.make_context("exec", list(args))
    except (click.UsageError, click.exceptions.Exit):
        return None
    return dict(ctx.params)


def check_same(args: list[str]) -> dict[str, object] | None:
    fast = fastexec.parse(args)
    if fast is not None:
        slow = click_params(args)
        assert slow is not None, args
        assert slow.pop("as_json") is False
        assert fast == slow, args
    return fast


#: Command lines the fast path must take (the usual spellings).
TAKEN = [
    ["sb", "--", "true"],
    ["sb", "true"],
    ["sb", "--", "sh", "-c", "echo hi; exit 3"],
    ["-i", "sb", "--", "cat"],
    ["sb", "-i", "--detach", "--", "cat", "--", "-x"],
    ["sb", "-e", "A=1", "-e", "B=", "--env", "C=x=y", "--", "env"],
    ["sb", "--env=A=1", "--cwd=/tmp", "--user=root", "--timeout=10s", "--", "pwd"],
    ["--cwd", "/tmp", "--user", "root", "--timeout", "1h", "sb", "--", "ls", "-l"],
    ["sb", "ls", "-", "--", "-l"],
    ["sb", "--cwd", "/a", "--cwd", "/b", "--", "pwd"],
    ["sb", "--", ""],
    ["sb", "--", "--", "--help"],
]
#: Command lines it must leave to click (help, JSON, unknown or unusual spellings, errors).
DECLINED = [
    [],
    ["sb"],
    ["sb", "--"],
    ["--help"],
    ["sb", "--help", "--", "true"],
    ["-h", "sb", "--", "true"],
    ["sb", "--json", "--", "true"],
    ["sb", "-ie", "A=1", "--", "true"],
    ["sb", "-eA=1", "--", "true"],
    ["sb", "--detach=1", "--", "true"],
    ["sb", "--cwd", "--", "true"],
    ["sb", "--cwd", "-x", "--", "true"],
    ["sb", "--timeout"],
    ["sb", "--no-such", "--", "true"],
    ["sb", "ls", "-l"],
    ["sb", "--interact", "--", "true"],
]


@pytest.mark.parametrize("args", TAKEN)
def test_takes_the_usual_spellings_as_click_does(args: list[str]) -> None:
    assert check_same(args) is not None


@pytest.mark.parametrize("args", DECLINED)
def test_leaves_the_rest_to_click(args: list[str]) -> None:
    assert fastexec.parse(args) is None


TOKENS = [
    "sb",
    "x",
    "--",
    "-",
    "-i",
    "--interactive",
    "--detach",
    "--json",
    "-e",
    "--env",
    "--env=K=V",
    "K=V",
    "--cwd",
    "--cwd=/w",
    "/w",
    "--user",
    "root",
    "--timeout",
    "5s",
    "--timeout=5s",
    "-h",
    "-x",
    "",
    "=",
]


def test_every_short_combination_means_what_click_makes_of_it() -> None:
    taken = 0
    for n in range(1, 5):
        for args in itertools.product(TOKENS, repeat=n):
            taken += check_same(list(args)) is not None
    assert taken > 1000  # the comparison covered many accepted lines, not only refusals


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=6)), max_size=8))
def test_any_command_line_means_what_click_makes_of_it(args: list[str]) -> None:
    check_same(args)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=70),
        st.from_regex(r"[a-z0-9][a-z0-9._-]{0,70}", fullmatch=True),
        st.sampled_from(["a", "a" * 63, "a" * 64, ".a", "-a", "a\n", "A", "sb-1.x_y"]),
    )
)
def test_names_follow_the_one_rule(name: str) -> None:
    assert fastexec.valid_name(name) == names.is_valid("sandbox", name)


@pytest.mark.parametrize(
    "env",
    [
        {"MVM_HOME": "/tmp/h"},
        {"MVM_HOME": "/tmp/h/"},
        {"MVM_HOME": "rel/h"},
        {"MVM_HOME": "/"},
        {"MVM_HOME": "", "HOME": "/root"},
        {"HOME": "/home/u"},
        {"HOME": "/home/u/"},
        {"HOME": "/home/u", "XDG_DATA_HOME": "/x/data"},
        {"HOME": "/home/u", "XDG_DATA_HOME": "relative"},
        {"HOME": "/home/u", "XDG_DATA_HOME": ""},
        {"MVM_HOME": "/a//b"},
        {"MVM_HOME": "./a"},
        {"MVM_HOME": "/a/./b"},
        {"HOME": "relative"},
    ],
)
def test_socket_is_the_clients(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.client import socket_path

    for k in ("MVM_HOME", "XDG_DATA_HOME", "HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fast = fastexec.socket_path()
    if fast is not None:  # None: an unusual spelling, left to the full path
        assert fast == str(socket_path()), env
    elif env.get("MVM_HOME") in ("/tmp/h", "rel/h") or env == {"HOME": "/home/u"}:
        pytest.fail(f"a usual home was declined: {env}")


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["sb", "-e", "K=secret:tok", "--", "true"], {}),
        (["sb", "-e", "novalue", "--", "true"], {}),
        (["Bad", "--", "true"], {}),
        (["sb", "--timeout", "soon", "--", "true"], {}),
        (["sb", "--", "a\x00b"], {}),
        (["sb", "--", "\udcff"], {}),
        (["sb", "--", "x" * (fastexec.FAST_COMMAND_CHARS + 1)], {}),
        (["sb", "--", "true"], {"MVM_URL": "http://127.0.0.1:1"}),
        (["sb", "--", "true"], {"MVM_ACTOR": "not an actor"}),
        (["sb", "--", "true"], {"_MVMCTL_COMPLETE": "bash_source"}),
    ],
)
def test_plan_leaves_errors_and_unusual_requests_to_the_full_path(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert fastexec.plan(args) is None


def test_plan_is_the_full_paths_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    import msgspec

    from mvm.api import models as M

    monkeypatch.setenv("MVM_HOME", os.fspath(tmp_path))
    monkeypatch.setenv("MVM_ACTOR", "ci@host")
    args = ["sb", "-e", "A=1", "--cwd", "/w", "--user", "root", "--timeout", "90s", "--detach"]
    planned = fastexec.plan([*args, "--", "sh", "-c", "x"])
    assert planned is not None
    sock, name, body, headers = planned
    assert sock == os.path.join(tmp_path, "mvmd.sock") and name == "sb"
    assert headers == {"content-type": "application/json", "X-Mvm-Actor": "ci@host"}
    sent = msgspec.json.decode(msgspec.json.encode(body), type=M.ExecRequest)
    assert sent == M.ExecRequest(
        argv=["sh", "-c", "x"], env={"A": "1"}, cwd="/w", user="root", timeout=90.0, detach=True
    )


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"stdout","data":"aGk="}',
        b'{"type":"stderr","data":""}',
        b'{"type":"exit","exit_code":3,"duration":0.5,"audit_id":"1-ab"}',
        b'{"type":"exit","exit_code":null,"timed_out":true,"signal":9}',
        b'{"type":"exit","exit_code":0,"truncated_stdout":false,"truncated_stderr":true}',
    ],
)
def test_plain_events_decode_as_msgspec_does(line: bytes) -> None:
    import msgspec

    from mvm.api import models as M

    ev = msgspec.json.decode(line, type=M.ExecEvent)
    assert fastexec._plain(line) == (ev.type, ev.data, ev.exit_code, ev.timed_out)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[]",
        b'{"type":"error","error":{"error":"NotFound","message":"m"}}',
        b'{"type":"stdout","data":"***"}',
        b'{"type":"exit","exit_code":true}',
        b'{"type":"exit","exit_code":1.5}',
        b'{"type":"exit","timed_out":1}',
        b'{"type":"stdout","data":5}',
        b'{"type":"progress"}',
        b'{"type":"exit","new_field":1}',
    ],
)
def test_anything_else_goes_to_the_clients_decoder(line: bytes) -> None:
    assert fastexec._plain(line) is None


def test_unusual_events_are_the_clients() -> None:
    from mvm import errors

    with pytest.raises(errors.SandboxNotFound) as exc:
        fastexec._slow_event(
            b'{"type":"error","error":{"error":"SandboxNotFound","message":"gone"}}'
        )
    assert exc.value.message == "gone"
    with pytest.raises(errors.MvmError, match="exec failed"):
        fastexec._slow_event(b'{"type":"error"}')
    with pytest.raises(errors.MvmError, match="malformed exec event"):
        fastexec._slow_event(b'{"type":"exit","exit_code":true}')
    assert fastexec._slow_event(b'{"type":"progress"}') is None
    assert fastexec._slow_event(b'{"type":"exit","exit_code":2,"new":1}') == ("exit", b"", 2, False)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_transport_skips_quote_only_when_quote_changes_nothing(text: str) -> None:
    from urllib.parse import quote

    from mvm import transport

    if transport._UNQUOTED.issuperset(text):
        assert quote(text, safe=transport._SAFE) == text
