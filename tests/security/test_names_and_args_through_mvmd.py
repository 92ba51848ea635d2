"""Issue 11.1 and 11.4 through a real mvmd: a hostile name never reaches another sandbox,
and a large argument either works end to end or is refused with one clear line.

Two sandboxes (``victim`` and ``p2``) run in a private home; every hostile name from the
report is tried with ``mvmctl``; afterwards both run and ``victim``'s file is untouched.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from mvm.agent import protocol as P
from mvm.api import models as M
from tests.integration.mvmd_home import Ctl, private_home, raw_api

V = f"/{M.API_VERSION}"

pytestmark = [pytest.mark.timeout(900)]

MARK = "victim-data-7f3a"


@pytest.fixture(scope="module")
def ctl() -> Iterator[Ctl]:
    with private_home("mvmd-names-") as h:
        c = Ctl(h)
        for name in ("victim", "p2"):
            c.ok("up", "--name", name, "--ttl", "30m", timeout=600)
        c.ok("fs", "write", "victim", "/work/f", input=MARK)
        yield c


@pytest.fixture(scope="module")
def http(ctl: Ctl) -> Iterator[httpx.Client]:
    """The raw API on the module's mvmd socket (what the report's curl did)."""
    with raw_api(ctl.home) as c:
        yield c


def one_clear_line(err: str) -> bool:
    """An mvm error: no traceback, one ``mvm:`` line (a ``hint:`` line may follow)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return (
        "Traceback" not in err
        and len([ln for ln in lines if ln.startswith("mvm:")]) == 1
        and len(lines) <= 2
    )


HOSTILE = [
    ("down", "nothere/../victim"),
    ("exec", "zzz/../p2", "--", "ls"),
    ("exec", "zzz/../victim", "--", "rm", "-f", "/work/f"),
    ("fs", "read", "x/../victim", "/work/f"),
    ("fs", "rm", "x/../victim", "/work/f"),
    ("exec", "p2?x=1", "--", "echo", "hi"),
    ("exec", "victim#frag", "--", "echo", "hi"),
    ("exec", "a\x01b", "--", "true"),
    ("exec", "%2e%2e", "--", "true"),
    ("pause", "../sandboxes/victim"),
    ("snapshot", "save", "victim", "../../x"),
    ("snapshot", "rm", "victim", "a/../../victim"),
    ("forward", "victim", "--remove", "../../victim"),
    ("proc", "ls", "x/.."),
    ("logs", ".."),
]


@pytest.mark.parametrize("args", HOSTILE, ids=lambda a: " ".join(a)[:40].encode().hex()[:16])
def test_a_hostile_name_is_refused_in_one_line(ctl: Ctl, args: tuple[str, ...]) -> None:
    r = ctl(*args)
    assert r.rc == 2, str(r)
    assert one_clear_line(r.err), str(r)
    assert "invalid" in r.err and "name" in r.err, str(r)


def test_the_victim_survives_untouched(ctl: Ctl) -> None:
    for args in HOSTILE:
        ctl(*args)
    states = {n: s["state"] for n, s in ctl.sandboxes().items()}
    assert states == {"victim": "running", "p2": "running"}
    assert ctl.ok("fs", "read", "victim", "/work/f").out == MARK
    assert ctl.ok("exec", "p2", "--", "echo", "ok").out == "ok\n"


def test_a_large_argument_works_through_mvmd(ctl: Ctl) -> None:
    big = "a" * 100_000
    r = ctl.ok("exec", "p2", "--", "echo", big)
    assert r.out == big + "\n"
    proc = ctl.ok("proc", "start", "p2", "--", "sh", "-c", 'printf %s "$1" | wc -c', "sh", big)
    pid = proc.out.strip()
    ctl.ok("proc", "wait", "p2", pid, "--timeout", "60s")
    assert ctl.ok("proc", "output", "p2", pid).out.strip() == "100000"


def test_a_too_large_command_is_refused_before_sending(ctl: Ctl) -> None:
    """Over protocol.MAX_SPEC in all (one argument over 128 KiB cannot even reach mvmctl)."""
    for sub in ("exec", "proc start"):
        r = ctl(*sub.split(), "p2", "--", "echo", *["a" * 100_000] * 6)
        assert r.rc == 2, str(r)[:500]
        assert one_clear_line(r.err), r.err[:500]
        assert f"{P.MAX_SPEC // 1024} KiB" in r.err


def test_a_2mb_argv_on_the_raw_api_is_a_json_error_not_a_stream(
    ctl: Ctl, http: httpx.Client
) -> None:
    """As reported: a 2 MB argv got ``200 OK``, chunked, with an HTTP 500 inside the body.
    Now mvmd refuses it before the stream starts: a plain JSON 4xx naming the limit."""
    argv = ["echo", *["a" * 100_000] * 21]  # each argument legal, 2.1 MB in all
    for route in ("exec", "procs"):
        r = http.post(f"{V}/sandboxes/p2/{route}", json={"argv": argv})
        assert r.status_code in (400, 413), (route, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json"), r.headers
        body = r.json()
        assert body["error"] == "InvalidArgument", body
        assert f"{P.MAX_SPEC // 1024} KiB" in body["message"], body
    assert ctl.ok("exec", "p2", "--", "echo", "ok").out == "ok\n"


def test_a_stream_that_breaks_midway_ends_with_an_error_event(ctl: Ctl, http: httpx.Client) -> None:
    """Once an exec stream has started, a failure (here: the sandbox's QEMU killed) ends
    it with a final ``error`` event in the same NDJSON (never an HTTP answer inside a
    chunk), and ``mvmctl exec`` turns it into one clear line and a non-zero exit."""
    ctl.ok("up", "--name", "doomed", "--ttl", "30m", timeout=600)
    try:
        qemu = int(str(ctl.sandboxes()["doomed"]["pid"]))
        script = "echo started; sleep 600"
        cli = ctl.popen("exec", "doomed", "--", "sh", "-c", script)
        assert cli.stdout is not None and cli.stderr is not None
        decoder = msgspec.json.Decoder(M.ExecEvent)
        events: list[M.ExecEvent] = []
        req = {"argv": ["sh", "-c", script], "timeout": 600}
        with http.stream("POST", f"{V}/sandboxes/doomed/exec", json=req) as r:
            assert r.status_code == 200, r.read()[:300]
            lines = r.iter_lines()
            for line in lines:  # every line an event, until the command's first output
                if not line:
                    continue
                events.append(decoder.decode(line))
                if b"started" in events[-1].data:
                    break
            assert cli.stdout.readline() == b"started\n"  # both streams have started
            os.kill(qemu, signal.SIGKILL)
            events += [decoder.decode(line) for line in lines if line]
        assert events[-1].type == "error", events
        assert events[-1].error is not None and events[-1].error.message, events[-1]
        assert not [e for e in events if e.type == "exit"], events
        _, err = cli.communicate(timeout=120)
        assert cli.returncode not in (0, None), (cli.returncode, err)
        assert one_clear_line(err.decode()), err
        assert "HTTP" not in err.decode() and "chunk" not in err.decode(), err
    finally:
        ctl("down", "doomed", timeout=120)
