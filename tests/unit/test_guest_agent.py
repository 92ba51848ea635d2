"""The guest agent, in-process on the host: request validation, fs, exec, fuzzing.

The agent is driven through ``Agent.handle`` / ``Agent.dispatch`` with a fake
channel that records every frame (after encoding it, as the real channel would).
Nothing here calls ``shutdown``; the host clock and /dev/urandom are never touched
(``hello`` side effects are redirected to a recorder), and fs requests only ever
name paths inside a temporary directory.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.agent import protocol as P
from mvm.agent.guest import agent as A
from mvm.agent.guest import base, files, system

ME = pwd.getpwuid(os.getuid()).pw_name
IS_ROOT = os.getuid() == 0

# --------------------------------------------------------------------------- fakes


class FakeChannel:
    """Records frames. Like the real Channel, ``send`` raises FrameError for oversized frames."""

    def __init__(self) -> None:
        self.frames: list[P.Frame] = []
        self.not_wire_valid: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.fd = -1

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = P.encode(header, payload)
        try:
            (frame,) = P.FrameDecoder(strict=True).feed(data)
        except P.FrameError:
            # encode() accepted it, but the host's strict reader would not.
            frame = P.Frame(json.loads(json.dumps(header)), payload)
            self.not_wire_valid.append(frame.header)
        with self.cond:
            self.frames.append(frame)
            self.cond.notify_all()

    def for_id(self, rid: int) -> list[P.Frame]:
        with self.cond:
            return [f for f in self.frames if f.id == rid]

    def finals(self, rid: int) -> list[P.Frame]:
        return [f for f in self.for_id(rid) if f.type in (P.OK, P.ERR)]

    def wait(self, rid: int, types: tuple[str, ...], timeout: float = 60.0) -> P.Frame:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for f in self.frames:
                    if f.id == rid and f.type in types:
                        return f
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {types} frame for id {rid}: {self.frames}")
                self.cond.wait(left)

    def out(self, rid: int, stream: str) -> bytes:
        return b"".join(
            f.payload for f in self.for_id(rid) if f.type == P.OUT and f.header["stream"] == stream
        )


class SideEffects:
    """Stands in for the guest-only side effects of ``hello`` (clock, RNG) and ``shutdown``."""

    def __init__(self) -> None:
        self.clock: list[tuple[int, float]] = []
        self.urandom = bytearray()

    def clock_settime(self, clk: int, value: float) -> None:
        self.clock.append((clk, value))

    def open(self, path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if path == "/dev/urandom" and "w" in mode:
            side = self

            class Sink(io.BytesIO):
                def close(self) -> None:
                    side.urandom += self.getvalue()
                    super().close()

            return Sink()
        raise PermissionError(f"test: the agent may not open {path}")


@pytest.fixture(scope="module", autouse=True)
def side_effects() -> Iterator[SideEffects]:
    """Module-wide: the agent must never set the host clock or write /proc/sysrq-trigger."""
    fx = SideEffects()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "clock_settime", fx.clock_settime)
        mp.setattr(system, "open", fx.open, raising=False)
        yield fx


@pytest.fixture
def ch() -> FakeChannel:
    return FakeChannel()


@pytest.fixture
def agent(ch: FakeChannel) -> A.Agent:
    return A.Agent(ch)  # type: ignore[arg-type]


_ids = iter(range(1000, 2**40))


def request(
    agent: A.Agent, ch: FakeChannel, t: str, payload: bytes = b"", **fields: Any
) -> P.Frame:
    """Send one request through ``handle`` and return its single final reply."""
    rid = next(_ids)
    agent.handle(P.Frame({**fields, "t": t, "id": rid}, payload))
    finals = ch.finals(rid)
    assert len(finals) == 1, finals
    return finals[0]


def ok(frame: P.Frame) -> P.Frame:
    assert frame.type == P.OK, frame.header
    return frame


def err(frame: P.Frame, code: str) -> str:
    assert frame.type == P.ERR, frame.header
    assert frame.header["code"] == code, frame.header
    message = frame.header["message"]
    assert isinstance(message, str) and message
    return message


# --------------------------------------------------------------------------- basics


def test_ping(agent: A.Agent, ch: FakeChannel) -> None:
    """ping answers ok with the request id and nothing else."""
    f = ok(request(agent, ch, P.PING))
    assert f.payload == b""
    assert set(f.header) == {"t", "id"}


def test_hello_echoes_nonce(agent: A.Agent, ch: FakeChannel) -> None:
    """The handshake depends on the nonce coming back unchanged, with the protocol version."""
    f = ok(request(agent, ch, P.HELLO, nonce="abc123", version=1))
    assert f.header["nonce"] == "abc123"
    assert f.header["version"] == P.PROTOCOL_VERSION
    assert f.header["python"] == sys.version.split()[0]
    assert f.header["kernel"] == os.uname().release


@pytest.mark.parametrize("nonce", [None, 5, ["x"], {"a": 1}, True])
def test_hello_non_string_nonce_is_blank(agent: A.Agent, ch: FakeChannel, nonce: Any) -> None:
    """A non-string nonce is never echoed back as-is."""
    assert ok(request(agent, ch, P.HELLO, nonce=nonce)).header["nonce"] == ""


def test_hello_sets_clock_and_mixes_seed(
    agent: A.Agent, ch: FakeChannel, side_effects: SideEffects
) -> None:
    """hello sets the guest clock from 'time' and writes 'seed' (hex) into the RNG."""
    side_effects.clock.clear()
    side_effects.urandom.clear()
    ok(request(agent, ch, P.HELLO, nonce="n", time=1_700_000_000.5, seed="00ff10"))
    assert side_effects.clock == [(time.CLOCK_REALTIME, 1_700_000_000.5)]
    assert bytes(side_effects.urandom) == b"\x00\xff\x10"


@pytest.mark.parametrize(
    "fields",
    [
        {"time": 5},  # implausibly old: ignored
        {"time": True},
        {"time": "1700000000"},
        {"seed": "zz"},  # not hex: ignored
        {"seed": "ab" * 600},  # too long: ignored
        {"seed": 12},
    ],
)
def test_hello_ignores_bad_time_and_seed(
    agent: A.Agent, ch: FakeChannel, side_effects: SideEffects, fields: dict[str, Any]
) -> None:
    """Bad clock/seed values are ignored, and hello still succeeds."""
    side_effects.clock.clear()
    side_effects.urandom.clear()
    ok(request(agent, ch, P.HELLO, nonce="n", **fields))
    assert side_effects.clock == []
    assert side_effects.urandom == b""


@pytest.mark.parametrize("t", ["nope", "", "EXEC", P.OK, P.ERR, P.OUT, P.READY, "fs.readx"])
def test_unknown_type_is_bad_request(agent: A.Agent, ch: FakeChannel, t: str) -> None:
    """Replies and unknown names are not requests: err bad_request, naming the type."""
    msg = err(request(agent, ch, t), P.E_BAD_REQUEST)
    assert "unknown request type" in msg


def test_dispatch_unknown_type_inline(agent: A.Agent, ch: FakeChannel) -> None:
    """dispatch answers unknown types itself, without spending a worker thread."""
    before = threading.active_count()
    agent.dispatch(P.Frame({"t": "bogus", "id": 77}))
    assert threading.active_count() == before
    (f,) = ch.finals(77)
    err(f, P.E_BAD_REQUEST)


def test_dispatch_runs_requests_in_threads(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """Threaded requests (fs.*) still get exactly one reply, and the slot is released."""
    (tmp_path / "f").write_bytes(b"data")
    for rid in range(500, 510):
        agent.dispatch(P.Frame({"t": P.FS_READ, "id": rid, "path": str(tmp_path / "f")}))
    for rid in range(500, 510):
        f = ch.wait(rid, (P.OK, P.ERR))
        assert f.type == P.OK and f.payload == b"data"
    deadline = time.monotonic() + 30  # a generous bound (loaded host), not a threshold
    while agent.threads._value != A.MAX_THREADS and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    assert agent.threads._value == A.MAX_THREADS  # type: ignore[attr-defined]


def test_dispatch_busy(agent: A.Agent, ch: FakeChannel) -> None:
    """With every worker slot taken, a request is refused at once (no unbounded threads)."""
    agent.threads = threading.BoundedSemaphore(1)
    assert agent.threads.acquire(blocking=False)
    agent.dispatch(P.Frame({"t": P.FS_STAT, "id": 9, "path": "/"}))
    (f,) = ch.finals(9)
    assert "busy" in err(f, P.E_INTERNAL)


def test_dispatch_ping_is_inline(agent: A.Agent, ch: FakeChannel) -> None:
    """ping/hello are answered before dispatch returns (cheap and order-sensitive)."""
    agent.dispatch(P.Frame({"t": P.PING, "id": 11}))
    assert [f.type for f in ch.finals(11)] == [P.OK]


def test_reply_to_request_without_id_is_wire_valid(agent: A.Agent, ch: FakeChannel) -> None:
    """A request the decoder accepted (no 'id' means 0) must get a reply the host accepts."""
    (frame,) = P.FrameDecoder(strict=False).feed(P.encode({"t": P.PING}))
    agent.handle(frame)
    assert ch.not_wire_valid == []
    assert [f.type for f in ch.finals(0)] == [P.OK]


# --------------------------------------------------------------------------- exec validation

VALID_EXEC: dict[str, Any] = {"argv": ["/bin/true"], "user": ME, "cwd": "/"}

BAD_EXEC: dict[str, dict[str, Any]] = {
    "argv missing": {"argv": None},
    "argv string": {"argv": "/bin/true"},
    "argv empty": {"argv": []},
    "argv non-string": {"argv": ["/bin/true", 1]},
    "argv nested": {"argv": [["/bin/true"]]},
    "argv NUL": {"argv": ["/bin/true", "a\x00b"]},
    "env not dict": {"env": ["A=b"]},
    "env '=' in key": {"env": {"A=B": "c"}},
    "env empty key": {"env": {"": "c"}},
    "env NUL in key": {"env": {"A\x00": "c"}},
    "env NUL in value": {"env": {"A": "c\x00"}},
    "env non-string value": {"env": {"A": 1}},
    "timeout negative": {"timeout": -1},
    "timeout zero": {"timeout": 0},
    "timeout bool": {"timeout": True},
    "timeout string": {"timeout": "5"},
    "output_limit bool": {"output_limit": True},
    "output_limit negative": {"output_limit": -1},
    "output_limit float": {"output_limit": 1.5},
    "stdin_open int": {"stdin_open": 1},
    "cwd int": {"cwd": 5},
    "cwd NUL": {"cwd": "/\x00"},
    "user int": {"user": 0},
    "user NUL": {"user": "ro\x00ot"},
    "unknown user": {"user": "no-such-user-mvm-test"},
}


@pytest.mark.parametrize("bad", list(BAD_EXEC.values()), ids=list(BAD_EXEC))
def test_malformed_exec_is_bad_request(
    agent: A.Agent, ch: FakeChannel, bad: dict[str, Any]
) -> None:
    """Every malformed exec is refused before anything runs, and the agent keeps working."""
    rid = next(_ids)
    agent.handle(P.Frame({**VALID_EXEC, **bad, "t": P.EXEC, "id": rid}))
    frames = ch.for_id(rid)
    assert [f.type for f in frames] == [P.ERR], frames  # no STARTED, no OUT
    err(frames[0], P.E_BAD_REQUEST)
    ok(request(agent, ch, P.PING))


def test_valid_exec_baseline(agent: A.Agent, ch: FakeChannel) -> None:
    """The baseline the malformed cases are derived from really is valid."""
    assert ok(request(agent, ch, P.EXEC, **VALID_EXEC)).header["exit_code"] == 0


def test_exec_missing_cwd_is_not_found(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """A working directory that does not exist is reported, not a crash."""
    msg = err(
        request(agent, ch, P.EXEC, **{**VALID_EXEC, "cwd": str(tmp_path / "nope")}), P.E_NOT_FOUND
    )
    assert "nope" in msg


# --------------------------------------------------------------------------- exec


def run(
    agent: A.Agent, ch: FakeChannel, argv: list[str], cwd: Path, **fields: Any
) -> tuple[int, P.Frame]:
    rid = next(_ids)
    agent.handle(
        P.Frame({"t": P.EXEC, "id": rid, "argv": argv, "user": ME, "cwd": str(cwd), **fields})
    )
    (final,) = ch.finals(rid)
    return rid, ok(final)


def test_exec_exit_code_and_streams(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """exit code, stdout and stderr come back separately; STARTED precedes output."""
    rid, f = run(agent, ch, ["sh", "-c", "echo out; echo err >&2; exit 3"], tmp_path)
    assert f.header["exit_code"] == 3
    assert f.header["signal"] is None
    assert f.header["timed_out"] is False
    assert f.header["truncated"] == {"stdout": False, "stderr": False}
    assert ch.out(rid, "stdout") == b"out\n"
    assert ch.out(rid, "stderr") == b"err\n"
    assert f.header["stdout_bytes"] == 4 and f.header["stderr_bytes"] == 4
    types = [x.type for x in ch.for_id(rid)]
    assert types[0] == P.STARTED and types[-1] == P.OK
    started = ch.for_id(rid)[0]
    assert isinstance(started.header["pid"], int) and started.header["pid"] > 0


def test_exec_env_cwd_and_stdin(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """env is merged over the defaults, cwd is honoured, and the payload becomes stdin."""
    rid, f = run(
        agent,
        ch,
        ["sh", "-c", 'printf "%s|%s|%s|" "$FOO" "$PWD" "$LANG"; cat'],
        tmp_path,
        env={"FOO": "bar"},
        timeout=10,
    )
    assert f.header["exit_code"] == 0
    assert ch.out(rid, "stdout") == f"bar|{tmp_path}|C.UTF-8|".encode() + b""


def test_exec_stdin_payload(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """Bytes sent with the request reach the command's stdin, which is then closed."""
    rid = next(_ids)
    agent.handle(
        P.Frame(
            {"t": P.EXEC, "id": rid, "argv": ["cat"], "user": ME, "cwd": str(tmp_path)},
            b"\x00hello\xff",
        )
    )
    (f,) = ch.finals(rid)
    assert ok(f).header["exit_code"] == 0
    assert ch.out(rid, "stdout") == b"\x00hello\xff"


def test_exec_command_not_found(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """A missing program is exit 127 with a message on stderr, like a shell."""
    rid, f = run(agent, ch, [str(tmp_path / "no-such-program")], tmp_path)
    assert f.header["exit_code"] == 127
    err_text = ch.out(rid, "stderr")
    assert b"command not found" in err_text and b"no-such-program" in err_text
    assert f.header["stderr_bytes"] == len(err_text)
    assert not [x for x in ch.for_id(rid) if x.type == P.STARTED]


def test_exec_not_executable(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """A file without exec permission is exit 126 ('cannot execute')."""
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    if IS_ROOT:
        # root may execute anything with an x bit; a directory is never executable.
        script = tmp_path
    rid, f = run(agent, ch, [str(script)], tmp_path)
    assert f.header["exit_code"] == 126
    assert b"cannot execute" in ch.out(rid, "stderr")


def test_exec_output_limit(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """Output past the limit is dropped (never sent), flagged, and the command never blocks."""
    rid, f = run(
        agent,
        ch,
        ["sh", "-c", "head -c 3000000 /dev/zero; echo e >&2"],
        tmp_path,
        output_limit=1000,
    )
    assert f.header["exit_code"] == 0
    assert f.header["truncated"] == {"stdout": True, "stderr": False}
    assert f.header["stdout_bytes"] == 1000
    assert ch.out(rid, "stdout") == b"\0" * 1000
    assert ch.out(rid, "stderr") == b"e\n"


def test_exec_output_limit_zero(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """A zero limit sends no output at all but still reports the truncation."""
    rid, f = run(agent, ch, ["sh", "-c", "echo x; echo y >&2"], tmp_path, output_limit=0)
    assert [x for x in ch.for_id(rid) if x.type == P.OUT] == []
    assert f.header["truncated"] == {"stdout": True, "stderr": True}


def test_exec_timeout_kills_process_group(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """On timeout the whole process group is SIGKILLed, including background children."""
    # a timeout that did not fire ends with the 30 s sleeps: timed_out False, no signal
    rid, f = run(agent, ch, ["sh", "-c", "sleep 30 & echo $!; wait"], tmp_path, timeout=0.5)
    assert f.header["timed_out"] is True
    assert f.header["signal"] == 9
    assert f.header["exit_code"] == 128 + 9
    child = int(ch.out(rid, "stdout").strip())
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """True if ``pid`` is running (a zombie counts as dead)."""
    deadline = time.monotonic() + 30  # a generous bound (loaded host), not a threshold
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


def test_exec_signal_reported(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """A command killed by a signal reports it (and 128+N as the exit code)."""
    _, f = run(agent, ch, ["sh", "-c", "kill -TERM $$"], tmp_path)
    assert f.header["signal"] == 15
    assert f.header["exit_code"] == 143
    assert f.header["timed_out"] is False


def test_exec_stdin_and_signal_requests(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """stdin frames feed a running command; signal frames reach it; refs are checked."""
    rid = next(_ids)
    agent.dispatch(
        P.Frame(
            {
                "t": P.EXEC,
                "id": rid,
                "argv": ["cat"],
                "user": ME,
                "cwd": str(tmp_path),
                "stdin_open": True,
                "timeout": 20,
            }
        )
    )
    ch.wait(rid, (P.STARTED,))
    ok(request(agent, ch, P.STDIN, b"abc", ref=rid, eof=True))
    f = ok(ch.wait(rid, (P.OK, P.ERR)))
    assert f.header["exit_code"] == 0
    assert ch.out(rid, "stdout") == b"abc"

    rid2 = next(_ids)
    agent.dispatch(
        P.Frame(
            {
                "t": P.EXEC,
                "id": rid2,
                "argv": ["sleep", "30"],
                "user": ME,
                "cwd": str(tmp_path),
                "timeout": 20,
            }
        )
    )
    ch.wait(rid2, (P.STARTED,))
    err(request(agent, ch, P.SIGNAL, ref=rid2, signal=0), P.E_BAD_REQUEST)
    ok(request(agent, ch, P.SIGNAL, ref=rid2, signal=15))
    f2 = ok(ch.wait(rid2, (P.OK, P.ERR)))
    assert f2.header["signal"] == 15 and f2.header["timed_out"] is False
    # Finished commands are forgotten.
    err(request(agent, ch, P.SIGNAL, ref=rid2, signal=15), P.E_UNKNOWN_REF)
    assert agent.procs == {}


def test_proc_background(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """proc.start returns at once; wait/output/list/signal see the process; events are id 0."""
    f = ok(
        request(
            agent,
            ch,
            P.PROC_START,
            argv=["sh", "-c", "echo hi; echo e >&2"],
            user=ME,
            cwd=str(tmp_path),
        )
    )
    num = f.header["proc"]
    assert isinstance(f.header["pid"], int)
    info = ok(request(agent, ch, P.PROC_WAIT, proc=num, timeout=10)).header
    assert (info["running"], info["exit_code"], info["signal"]) == (False, 0, None)
    out = ok(request(agent, ch, P.PROC_OUTPUT, proc=num, stream="stdout"))
    assert out.payload == b"hi\n"
    assert (out.header["offset"], out.header["lost"], out.header["end"]) == (0, 0, 3)
    assert ok(request(agent, ch, P.PROC_OUTPUT, proc=num, stream="stderr")).payload == b"e\n"
    err(request(agent, ch, P.PROC_OUTPUT, proc=num, stream="stdin"), P.E_BAD_REQUEST)
    err(request(agent, ch, P.PROC_WAIT, proc=num, timeout=-1), P.E_BAD_REQUEST)
    procs = ok(request(agent, ch, P.PROC_LIST)).header["procs"]
    assert [p["proc"] for p in procs] == [num]
    exit_event = ch.wait(0, (P.EVENT,))
    deadline = time.monotonic() + 30  # a generous bound (loaded host), not a threshold
    while time.monotonic() < deadline and not any(
        e.header.get("kind") == "proc.exit" for e in ch.for_id(0)
    ):
        time.sleep(0.01)
    assert exit_event.header["proc"] == num
    assert any(e.header.get("kind") == "proc.exit" for e in ch.for_id(0))
    err(request(agent, ch, P.PROC_WAIT, proc=num + 1), P.E_UNKNOWN_REF)
    err(request(agent, ch, P.PROC_WAIT, proc=True), P.E_UNKNOWN_REF)


def test_proc_start_not_found(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """A background command that cannot start is an error reply (not a process)."""
    msg = err(
        request(agent, ch, P.PROC_START, argv=[str(tmp_path / "nope")], user=ME, cwd=str(tmp_path)),
        P.E_NOT_FOUND,
    )
    assert "command not found" in msg
    assert ok(request(agent, ch, P.PROC_LIST)).header["procs"] == []


@pytest.mark.parametrize("t", [P.STDIN, P.SIGNAL])
@pytest.mark.parametrize("ref", [None, 12345, "1", True, -1])
def test_stdin_signal_unknown_ref(agent: A.Agent, ch: FakeChannel, t: str, ref: Any) -> None:
    """stdin/signal for a command that is not running are unknown_ref."""
    err(request(agent, ch, t, ref=ref, signal=15), P.E_UNKNOWN_REF)


# --------------------------------------------------------------------------- fs


def test_fs_write_read_round_trip(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """fs.write creates parents and the file; fs.read returns the bytes and the eof flag."""
    p = tmp_path / "a" / "b" / "file.bin"
    data = bytes(range(256)) * 10
    f = ok(request(agent, ch, P.FS_WRITE, data, path=str(p), owner="root", mode=0o600))
    assert f.header["size"] == len(data)
    assert p.read_bytes() == data
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    r = ok(request(agent, ch, P.FS_READ, path=str(p)))
    assert r.payload == data and r.header == {"t": P.OK, "id": r.id, "size": len(data), "eof": True}
    part = ok(request(agent, ch, P.FS_READ, path=str(p), offset=10, length=5))
    assert part.payload == data[10:15] and part.header["eof"] is False
    tail = ok(request(agent, ch, P.FS_READ, path=str(p), offset=len(data) - 3, length=100))
    assert tail.payload == data[-3:] and tail.header["eof"] is True
    past = ok(request(agent, ch, P.FS_READ, path=str(p), offset=len(data) + 10))
    assert past.payload == b"" and past.header["eof"] is True


def test_fs_write_offset_and_truncate(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """Chunked writes: offset>0 keeps earlier data; offset 0 truncates by default."""
    p = str(tmp_path / "f")
    ok(request(agent, ch, P.FS_WRITE, b"hello world", path=p, owner="root"))
    f = ok(request(agent, ch, P.FS_WRITE, b"WORLD", path=p, offset=6, owner="root"))
    assert f.header["size"] == 11
    assert Path(p).read_bytes() == b"hello WORLD"
    ok(request(agent, ch, P.FS_WRITE, b"hi", path=p, owner="root"))
    assert Path(p).read_bytes() == b"hi"
    ok(request(agent, ch, P.FS_WRITE, b"J", path=p, truncate=False, owner="root"))
    assert Path(p).read_bytes() == b"Ji"
    ok(request(agent, ch, P.FS_WRITE, b"", path=p, owner="root"))
    assert Path(p).read_bytes() == b""


def test_fs_write_without_parents(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """parents=False does not create directories: not_found."""
    p = str(tmp_path / "missing" / "f")
    err(request(agent, ch, P.FS_WRITE, b"x", path=p, parents=False, owner="root"), P.E_NOT_FOUND)
    assert not (tmp_path / "missing").exists()


def test_fs_write_errors(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """OS errors map to protocol codes: a directory target, a file as a parent."""
    (tmp_path / "file").write_text("x")
    err(request(agent, ch, P.FS_WRITE, b"x", path=str(tmp_path), owner="root"), P.E_IS_DIR)
    err(
        request(agent, ch, P.FS_WRITE, b"x", path=str(tmp_path / "file" / "sub"), owner="root"),
        P.E_NOT_DIR,
    )


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_fs_write_owner(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """New files and created parents belong to 'owner'; 'root' means no chown."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    p = tmp_path / "d" / "f"
    ok(request(agent, ch, P.FS_WRITE, b"x", path=str(p), owner="nobody"))
    assert (p.stat().st_uid, p.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert p.parent.stat().st_uid == nobody.pw_uid
    q = tmp_path / "g"
    ok(request(agent, ch, P.FS_WRITE, b"x", path=str(q), owner="root"))
    assert q.stat().st_uid == 0
    # An unknown owner falls back to no chown rather than failing.
    r = tmp_path / "h"
    ok(request(agent, ch, P.FS_WRITE, b"x", path=str(r), owner="no-such-user-mvm-test"))
    assert r.stat().st_uid == 0


def test_fs_read_errors(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """read of a directory, a missing file, a FIFO and bad arguments give distinct codes."""
    err(request(agent, ch, P.FS_READ, path=str(tmp_path)), P.E_IS_DIR)
    err(request(agent, ch, P.FS_READ, path=str(tmp_path / "nope")), P.E_NOT_FOUND)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "regular" in err(request(agent, ch, P.FS_READ, path=str(fifo)), P.E_BAD_REQUEST)
    (tmp_path / "f").write_text("x")
    for bad in (
        {"length": P.MAX_PAYLOAD + 1},
        {"length": -1},
        {"offset": -1},
        {"offset": True},
    ):
        err(request(agent, ch, P.FS_READ, path=str(tmp_path / "f"), **bad), P.E_BAD_REQUEST)


@pytest.mark.parametrize(
    "t", [P.FS_READ, P.FS_WRITE, P.FS_LIST, P.FS_STAT, P.FS_MKDIR, P.FS_REMOVE, P.FS_MOVE]
)
@pytest.mark.parametrize("path", ["relative/path", "", "/a\x00b", None, 5, ["/"]])
def test_fs_bad_paths(agent: A.Agent, ch: FakeChannel, t: str, path: Any) -> None:
    """Paths must be absolute strings without NUL; nothing is touched otherwise."""
    err(
        request(agent, ch, t, path=path, dest="/nonexistent-mvm-dest", owner="root"),
        P.E_BAD_REQUEST,
    )


def test_fs_list(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """fs.list: sorted entries with type, size, mode."""
    (tmp_path / "b.txt").write_bytes(b"12345")
    (tmp_path / "a").mkdir()
    (tmp_path / "c").symlink_to("b.txt")
    f = ok(request(agent, ch, P.FS_LIST, path=str(tmp_path)))
    assert f.header["truncated"] is False
    entries = f.header["entries"]
    assert [e["name"] for e in entries] == ["a", "b.txt", "c"]
    assert [e["type"] for e in entries] == ["dir", "file", "symlink"]
    assert entries[1]["size"] == 5
    assert entries[1]["mode"] == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)
    err(request(agent, ch, P.FS_LIST, path=str(tmp_path / "b.txt")), P.E_NOT_DIR)
    err(request(agent, ch, P.FS_LIST, path=str(tmp_path / "zz")), P.E_NOT_FOUND)


def test_fs_list_entry_cap(
    agent: A.Agent, ch: FakeChannel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Directories with more than MAX_LIST_ENTRIES entries are cut and flagged."""
    monkeypatch.setattr(files, "MAX_LIST_ENTRIES", 3)
    for i in range(5):
        (tmp_path / f"f{i}").touch()
    f = ok(request(agent, ch, P.FS_LIST, path=str(tmp_path)))
    assert len(f.header["entries"]) == 3
    assert f.header["truncated"] is True


def test_fs_list_reply_fits_one_frame(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """Long names: the listing is trimmed (and flagged) so the reply stays within MAX_HEADER."""
    for i in range(300):
        (tmp_path / (f"{i:03d}" + "n" * 200)).touch()
    f = ok(request(agent, ch, P.FS_LIST, path=str(tmp_path)))
    assert f.header["truncated"] is True
    assert 0 < len(f.header["entries"]) < 300


def test_fs_list_reply_fits_one_frame_non_ascii(
    agent: A.Agent, ch: FakeChannel, tmp_path: Path
) -> None:
    """Same as above with non-ASCII names (any user's files may have them)."""
    for i in range(150):
        (tmp_path / (f"{i:03d}" + "界" * 80)).touch()
    f = ok(request(agent, ch, P.FS_LIST, path=str(tmp_path)))
    assert f.header["truncated"] is True


def test_fs_stat(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """fs.stat reports the link itself (no following) and maps ENOENT."""
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to("f")
    f = ok(request(agent, ch, P.FS_STAT, path=str(tmp_path / "f")))
    st_ = (tmp_path / "f").stat()
    assert (f.header["type"], f.header["size"], f.header["uid"]) == ("file", 3, st_.st_uid)
    assert f.header["mtime"] == st_.st_mtime
    assert ok(request(agent, ch, P.FS_STAT, path=str(tmp_path / "l"))).header["type"] == "symlink"
    assert ok(request(agent, ch, P.FS_STAT, path=str(tmp_path))).header["type"] == "dir"
    assert ok(request(agent, ch, P.FS_STAT, path="/dev/null")).header["type"] == "other"
    err(request(agent, ch, P.FS_STAT, path=str(tmp_path / "nope")), P.E_NOT_FOUND)


def test_fs_mkdir(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """mkdir: exists, missing parent, parents=True (idempotent)."""
    d = tmp_path / "d"
    ok(request(agent, ch, P.FS_MKDIR, path=str(d), owner="root"))
    assert d.is_dir()
    err(request(agent, ch, P.FS_MKDIR, path=str(d), owner="root"), P.E_EXISTS)
    err(request(agent, ch, P.FS_MKDIR, path=str(tmp_path / "x" / "y"), owner="root"), P.E_NOT_FOUND)
    ok(request(agent, ch, P.FS_MKDIR, path=str(tmp_path / "x" / "y"), parents=True, owner="root"))
    assert (tmp_path / "x" / "y").is_dir()
    ok(request(agent, ch, P.FS_MKDIR, path=str(tmp_path / "x" / "y"), parents=True, owner="root"))
    err(request(agent, ch, P.FS_MKDIR, path=str(d), parents="yes", owner="root"), P.E_BAD_REQUEST)


def test_fs_remove(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """remove: files, empty dirs, not_empty without recursive, recursive, missing."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "e").mkdir()
    (tmp_path / "full" / "sub").mkdir(parents=True)
    (tmp_path / "full" / "sub" / "g").write_text("y")
    (tmp_path / "link").symlink_to(tmp_path / "full")
    ok(request(agent, ch, P.FS_REMOVE, path=str(tmp_path / "f")))
    ok(request(agent, ch, P.FS_REMOVE, path=str(tmp_path / "e")))
    err(request(agent, ch, P.FS_REMOVE, path=str(tmp_path / "full")), P.E_NOT_EMPTY)
    # A symlink to a directory is removed as a link, never followed.
    ok(request(agent, ch, P.FS_REMOVE, path=str(tmp_path / "link"), recursive=True))
    assert (tmp_path / "full" / "sub" / "g").exists()
    ok(request(agent, ch, P.FS_REMOVE, path=str(tmp_path / "full"), recursive=True))
    assert sorted(os.listdir(tmp_path)) == []
    err(request(agent, ch, P.FS_REMOVE, path=str(tmp_path / "f")), P.E_NOT_FOUND)


@pytest.fixture
def no_deletes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Turn every deletion primitive fs.remove uses into a recorder (safety for '/' tests)."""
    calls: list[str] = []

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(str(path))
        raise PermissionError(13, "test refuses deletions", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    monkeypatch.setattr(os, "rmdir", refuse)
    monkeypatch.setattr(os, "unlink", refuse)
    return calls


@pytest.mark.parametrize("path", ["/", "///", "/.", "/tmp/..", "/./"])
def test_fs_remove_refuses_root(
    agent: A.Agent, ch: FakeChannel, no_deletes: list[str], path: str
) -> None:
    """The guard refuses to remove / whatever the spelling (deletions are stubbed out)."""
    msg = err(request(agent, ch, P.FS_REMOVE, path=path, recursive=True), P.E_PERMISSION)
    assert "refusing" in msg
    assert no_deletes == []


@pytest.mark.parametrize("path", ["//", "//."])
def test_fs_remove_refuses_root_double_slash(
    agent: A.Agent, ch: FakeChannel, no_deletes: list[str], path: str
) -> None:
    """'//' is the root directory too (deletions are stubbed out: nothing is removed)."""
    reply = request(agent, ch, P.FS_REMOVE, path=path, recursive=True)
    assert no_deletes == [], f"fs.remove({path!r}) tried to delete: {no_deletes}"
    err(reply, P.E_PERMISSION)


def test_fs_move(agent: A.Agent, ch: FakeChannel, tmp_path: Path) -> None:
    """move renames files and directories; errors are reported against the source."""
    (tmp_path / "f").write_text("x")
    ok(request(agent, ch, P.FS_MOVE, path=str(tmp_path / "f"), dest=str(tmp_path / "g")))
    assert (tmp_path / "g").read_text() == "x" and not (tmp_path / "f").exists()
    msg = err(
        request(agent, ch, P.FS_MOVE, path=str(tmp_path / "f"), dest=str(tmp_path / "h")),
        P.E_NOT_FOUND,
    )
    assert str(tmp_path / "f") in msg
    err(
        request(agent, ch, P.FS_MOVE, path=str(tmp_path / "g"), dest=str(tmp_path / "no" / "h")),
        P.E_NOT_FOUND,
    )
    (tmp_path / "d").mkdir()
    (tmp_path / "e" / "x").mkdir(parents=True)
    err(
        request(agent, ch, P.FS_MOVE, path=str(tmp_path / "d"), dest=str(tmp_path / "e")),
        P.E_NOT_EMPTY,
    )
    err(request(agent, ch, P.FS_MOVE, path=str(tmp_path / "g"), dest="rel"), P.E_BAD_REQUEST)


def test_errno_mapping() -> None:
    """Unmapped errnos become 'internal' and messages name the path."""
    e = base.os_error(OSError(5, "Input/output error"), "/p")
    assert (e.code, e.message) == (P.E_INTERNAL, "/p: Input/output error")
    assert base.os_error(FileNotFoundError(2, "x"), "/p").code == P.E_NOT_FOUND


def test_internal_errors_are_reported(
    agent: A.Agent, ch: FakeChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in a handler becomes err internal; the agent survives."""

    def boom(self: A.Agent, rid: int, h: dict[str, Any], payload: bytes) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(A.HANDLERS, P.FS_STAT, boom)
    assert "ZeroDivisionError" in err(request(agent, ch, P.FS_STAT, path="/"), P.E_INTERNAL)
    ok(request(agent, ch, P.PING))


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = [
    "nonce", "time", "seed", "version", "ref", "signal", "group", "eof", "argv", "env", "cwd",
    "user", "timeout", "output_limit", "stdin_open", "path", "dest", "offset", "length", "mode",
    "parents", "truncate", "recursive", "owner", "proc", "stream",
]  # fmt: skip
fields = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=6)
# Never exec / shutdown / fs.* here: those run commands or touch paths on the host.
# proc.* other than proc.start only look up background processes, and none exist here.
SAFE_TYPES = st.sampled_from(
    [
        *(P.HELLO, P.PING, P.STDIN, P.SIGNAL, P.OK, P.ERR, P.OUT, P.READY, P.EVENT, "x"),
        *(P.PROC_LIST, P.PROC_WAIT, P.PROC_OUTPUT, P.PROC_STDIN, P.PROC_SIGNAL),
    ]
) | st.text(max_size=10).filter(lambda t: t not in P.REQUESTS)
invalid_argv = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=10),
    st.dictionaries(st.text(max_size=4), json_values, max_size=2),
    st.just([]),
    st.lists(json_values, max_size=3).map(lambda xs: [*xs, 0]),
    st.lists(st.text(max_size=6), max_size=3).map(lambda xs: [*xs, "nul\x00"]),
)


_FUZZ_AGENT: A.Agent | None = None


def fuzz_agent() -> tuple[A.Agent, FakeChannel]:
    """One agent for all fuzz examples (each Agent starts an event thread), fresh channel."""
    global _FUZZ_AGENT
    ch = FakeChannel()
    if _FUZZ_AGENT is None:
        _FUZZ_AGENT = A.Agent(ch)  # type: ignore[arg-type]
    _FUZZ_AGENT.ch = ch  # type: ignore[assignment]
    assert _FUZZ_AGENT.procs == {} and _FUZZ_AGENT.bg == {}
    return _FUZZ_AGENT, ch


def wire(header: dict[str, Any], payload: bytes) -> P.Frame | None:
    """The frame as the guest would see it after the wire (None if it never gets there)."""
    try:
        (frame,) = P.FrameDecoder(strict=True).feed(P.encode(header, payload))
    except (P.FrameError, ValueError):
        return None
    return frame


@given(
    extra=fields,
    t=SAFE_TYPES,
    rid=st.integers(min_value=1, max_value=2**53 - 1),
    payload=st.binary(max_size=32),
)
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_handle_never_raises(extra: dict[str, Any], t: str, rid: int, payload: bytes) -> None:
    """Random headers of safe types: handle never raises and answers exactly once."""
    frame = wire({**extra, "t": t, "id": rid}, payload)
    if frame is None:
        return
    agent, ch = fuzz_agent()
    agent.handle(frame)
    assert [f.id for f in ch.frames] == [rid]
    (final,) = ch.frames
    assert final.type in (P.OK, P.ERR)
    assert ch.not_wire_valid == []
    if t not in P.REQUESTS:
        assert final.header["code"] == P.E_BAD_REQUEST
    if t == P.PING:
        assert final.type == P.OK
    if t in (P.STDIN, P.SIGNAL, P.PROC_WAIT, P.PROC_OUTPUT, P.PROC_STDIN, P.PROC_SIGNAL):
        assert final.type == P.ERR  # nothing is running: never ok
    if t == P.PROC_LIST:
        assert final.header["procs"] == []


@given(
    t=st.sampled_from([P.EXEC, P.PROC_START]),
    extra=fields,
    argv=invalid_argv,
    rid=st.integers(min_value=1, max_value=2**53 - 1),
    payload=st.binary(max_size=32),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_exec_with_invalid_argv(
    t: str, extra: dict[str, Any], argv: Any, rid: int, payload: bytes
) -> None:
    """exec/proc.start with random fields but an always-invalid argv: bad_request, nothing runs."""
    frame = wire({**extra, "argv": argv, "t": t, "id": rid}, payload)
    if frame is None:
        return
    agent, ch = fuzz_agent()
    agent.handle(frame)
    assert [(f.type, f.id) for f in ch.frames] == [(P.ERR, rid)]
    assert ch.frames[0].header["code"] == P.E_BAD_REQUEST


FS_TYPES = [P.FS_READ, P.FS_WRITE, P.FS_LIST, P.FS_STAT, P.FS_MKDIR, P.FS_REMOVE, P.FS_MOVE]
# Path components never contain '/' or '..': every generated path stays inside the sandbox dir.
rel_paths = st.lists(st.sampled_from(["a", "b", "c.txt", "."]), min_size=0, max_size=3)
small_ints = st.integers(min_value=-3, max_value=1 << 16)
fs_fields = st.fixed_dictionaries(
    {},
    optional={
        "offset": small_ints | st.booleans() | st.none() | st.text(max_size=3),
        "length": small_ints | st.just(P.MAX_PAYLOAD + 1) | st.booleans(),
        "mode": st.integers(-1, 0o10000) | st.booleans() | st.text(max_size=3),
        "parents": json_values,
        "truncate": json_values,
        "recursive": json_values,
        "owner": st.sampled_from(["root", "nobody", "no-such-user-mvm-test", ""]) | json_values,
    },
)
fs_ops = st.lists(
    st.tuples(st.sampled_from(FS_TYPES), rel_paths, rel_paths, fs_fields, st.binary(max_size=64)),
    min_size=1,
    max_size=8,
)
FS_CODES = {
    P.E_BAD_REQUEST, P.E_NOT_FOUND, P.E_EXISTS, P.E_IS_DIR, P.E_NOT_DIR, P.E_NOT_EMPTY,
    P.E_PERMISSION, P.E_INTERNAL,
}  # fmt: skip


@given(ops=fs_ops)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_fs_confined_to_tmp(
    ops: list[tuple[str, list[str], list[str], dict[str, Any], bytes]],
) -> None:
    """Random fs request sequences inside a temp dir: one final reply each, sane codes."""
    with tempfile.TemporaryDirectory(prefix="mvm-fuzz-", ignore_cleanup_errors=True) as outer:
        base = os.path.join(outer, "root")
        os.mkdir(base)
        agent, ch = fuzz_agent()
        for rid, (t, src, dst, extra, payload) in enumerate(ops, start=1):
            path = "/".join([base, *src])
            dest = "/".join([base, *dst])
            frame = wire({**extra, "t": t, "id": rid, "path": path, "dest": dest}, payload)
            assert frame is not None
            agent.handle(frame)
            frames = ch.for_id(rid)
            assert len(frames) == 1, frames
            (f,) = frames
            assert f.type in (P.OK, P.ERR)
            if f.type == P.ERR:
                assert f.header["code"] in FS_CODES, f.header
                if f.header["code"] == P.E_INTERNAL:
                    # Only EINVAL/EBUSY of rename/rmdir ('dir/.', a directory into itself).
                    assert t in (P.FS_MOVE, P.FS_REMOVE), f.header
                    assert re.search("Invalid argument|busy", f.header["message"]), f.header
            elif t == P.FS_READ:
                length = extra.get("length", P.CHUNK)
                assert len(f.payload) <= length
        assert len(ch.frames) == len(ops)
        assert ch.not_wire_valid == []
        # Nothing escaped the sandbox dir.
        assert set(os.listdir(outer)) <= {"root"}
