"""The host AgentClient against a fake, hostile guest on a Unix socketpair.

Every test runs under asyncio.wait_for: the client must fail fast and clearly
(AgentProtocolError / VMDied / CommandTimeout), never hang, and never keep more
output than it asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient, Entry, ExecResult, Stat
from mvm.errors import (
    AgentError,
    AgentProtocolError,
    CommandTimeout,
    InvalidArgument,
    VMDied,
)

T = TypeVar("T")
#: Bound for any single scenario, the "did not hang" check: generous (a loaded host is
#: slow), and far below HOLD so a client that waits for the guest cannot pass.
SCENARIO_TIMEOUT = 60.0
#: How long a scripted guest keeps its end open (it is cancelled when the scenario ends).
HOLD = 600


class Guest:
    """The guest end of the connection, scripted per test (strict decoder on its side)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = P.FrameDecoder(strict=True)
        self.pending: list[P.Frame] = []
        self.received: list[P.Frame] = []

    async def recv(self) -> P.Frame:
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("host closed")
            self.pending += self.decoder.feed(data)
        frame = self.pending.pop(0)
        self.received.append(frame)
        return frame

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        await self.raw(P.encode(header, payload))

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, req: P.Frame, **fields: Any) -> None:
        await self.send({**fields, "t": P.OK, "id": req.id})

    def close(self) -> None:
        self.writer.close()


Scenario = Callable[[Guest], Awaitable[None]]


def run_scenario(
    scenario: Scenario,
    body: Callable[[AgentClient], Awaitable[T]],
    timeout: float = SCENARIO_TIMEOUT,
) -> tuple[T, AgentClient, Guest]:
    """Connect a client to a scripted guest and run ``body``; raise TimeoutError if it hangs.

    The guard does not rely on cancelling the body (asyncio.wait_for on Python 3.11 can
    lose a cancellation): on a hang the guest end is closed, which makes every pending
    request fail with VMDied, and then TimeoutError is raised.
    """

    async def main() -> tuple[T, AgentClient, Guest]:
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=host_sock, limit=P.MAX_BODY + 64)
        greader, gwriter = await asyncio.open_unix_connection(sock=guest_sock)
        guest = Guest(greader, gwriter)
        client = AgentClient(reader, writer)
        gtask = asyncio.create_task(_guarded(scenario(guest)))
        task = asyncio.create_task(body(client))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        finally:
            # Guest first: its EOF ends the client's read loop even if a cancel is lost.
            gtask.cancel()
            with contextlib.suppress(BaseException):
                await gtask
            guest.close()
            await _bounded(client.close(), "AgentClient.close()")
            if not task.done():
                await asyncio.wait({task}, timeout=2.0)
            if not task.done():
                task.cancel()
        if not done:
            with contextlib.suppress(BaseException):
                task.result()
            raise TimeoutError(f"the client did not finish within {timeout}s")
        return task.result(), client, guest

    return asyncio.run(main())


async def _bounded(coro: Awaitable[None], what: str, timeout: float = 30.0) -> None:
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise TimeoutError(f"{what} did not return within {timeout}s")
    task.result()


async def _guarded(coro: Awaitable[None]) -> None:
    with contextlib.suppress(EOFError, ConnectionError, asyncio.CancelledError):
        await coro


def expect(
    exc_type: type[BaseException], scenario: Scenario, body: Callable[[AgentClient], Awaitable[Any]]
) -> tuple[BaseException, AgentClient]:
    """Run the scenario and return the exception the client raised (which must be exc_type)."""
    box: dict[str, Any] = {}

    async def wrapped(client: AgentClient) -> None:
        box["client"] = client
        with pytest.raises(exc_type) as info:
            await body(client)
        box["exc"] = info.value

    run_scenario(scenario, wrapped)
    return box["exc"], box["client"]


# --------------------------------------------------------------------------- happy path


def test_call_round_trip() -> None:
    """A well-behaved guest: requests carry fresh ids and the reply is matched by id."""

    async def guest(g: Guest) -> None:
        for _ in range(2):
            req = await g.recv()
            await g.reply(req, echo=req.type)

    async def body(c: AgentClient) -> tuple[P.Frame, P.Frame]:
        a = await c.call(P.PING)
        b = await c.call("fs.stat", {"path": "/x"})
        return a, b

    (a, b), client, g = run_scenario(guest, body)
    assert a.header["echo"] == P.PING and b.header["echo"] == "fs.stat"
    assert [f.id for f in g.received] == [1, 2]
    assert g.received[1].header["path"] == "/x"
    assert client.dropped_frames == 0


def test_replies_out_of_order_are_matched_by_id() -> None:
    """Concurrent requests: each caller gets its own reply even if they come back reversed."""

    async def guest(g: Guest) -> None:
        first, second = await g.recv(), await g.recv()
        await g.reply(second, n=second.header["n"])
        await g.reply(first, n=first.header["n"])

    async def body(c: AgentClient) -> list[P.Frame]:
        return list(await asyncio.gather(c.call("x", {"n": 1}), c.call("x", {"n": 2})))

    (one, two), _, _ = run_scenario(guest, body)
    assert (one.header["n"], two.header["n"]) == (1, 2)


def test_err_reply_becomes_agent_error() -> None:
    """ERR frames raise AgentError with the guest's code; long messages are cut."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send({"t": P.ERR, "id": req.id, "code": P.E_NOT_FOUND, "message": "m" * 5000})

    exc, _ = expect(AgentError, guest, lambda c: c.call(P.FS_STAT, {"path": "/x"}))
    assert exc.data["code"] == P.E_NOT_FOUND  # type: ignore[attr-defined]
    assert len(str(exc)) < 2100


def test_err_reply_with_junk_fields() -> None:
    """An ERR frame whose code/message are not strings still gives a clean AgentError."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send({"t": P.ERR, "id": req.id, "code": 5, "message": ["x"]})

    exc, _ = expect(AgentError, guest, lambda c: c.call(P.PING))
    assert exc.data["code"] == P.E_INTERNAL  # type: ignore[attr-defined]
    assert "error" in str(exc)


# --------------------------------------------------------------------------- hostile framing


def test_oversized_length_prefix() -> None:
    """A length prefix beyond MAX_BODY fails the connection at once, with a clear message."""

    async def guest(g: Guest) -> None:
        await g.recv()
        await g.raw(P.MAGIC + struct.pack(">II", P.MAX_BODY + 1, 8))
        await asyncio.sleep(HOLD)  # keep the socket open: the client must not wait for a body

    exc, client = expect(AgentProtocolError, guest, lambda c: c.call(P.PING))
    assert "broke the agent protocol" in str(exc) and "exceeds" in str(exc)
    assert client.failure is exc


def test_invalid_json_header() -> None:
    """A header that is not JSON is a protocol violation."""

    async def guest(g: Guest) -> None:
        await g.recv()
        head = b"{this is not json"
        await g.raw(P.MAGIC + struct.pack(">II", 4 + len(head), len(head)) + head)
        await asyncio.sleep(HOLD)

    exc, _ = expect(AgentProtocolError, guest, lambda c: c.call(P.PING))
    assert "not valid JSON" in str(exc)


def test_garbage_before_any_request() -> None:
    """Junk written before anything was asked still fails the connection for later callers."""

    async def guest(g: Guest) -> None:
        await g.raw(b"HTTP/1.1 200 OK\r\n\r\n")
        await asyncio.sleep(HOLD)

    async def body(c: AgentClient) -> None:
        for _ in range(100):
            if c.failure is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(AgentProtocolError, match="bad magic"):
            await c.call(P.PING)
        # ... and keeps failing, fast, for every later request.
        with pytest.raises(AgentProtocolError):
            await c.exec(["true"])

    run_scenario(guest, body)


def test_failure_wakes_every_pending_request() -> None:
    """All in-flight requests get the failure, not just the one the bad frame was for."""

    async def guest(g: Guest) -> None:
        for _ in range(3):
            await g.recv()
        await g.raw(b"XXXX" * 4)
        await asyncio.sleep(HOLD)

    async def body(c: AgentClient) -> list[Any]:
        return list(
            await asyncio.gather(
                c.call(P.PING), c.call(P.PING), c.call(P.PING), return_exceptions=True
            )
        )

    results, _, _ = run_scenario(guest, body)
    assert all(isinstance(r, AgentProtocolError) for r in results), results


def test_guest_closes_connection() -> None:
    """EOF from the guest is VMDied, for calls in flight and calls made afterwards."""

    async def guest(g: Guest) -> None:
        await g.recv()
        g.close()

    async def body(c: AgentClient) -> None:
        with pytest.raises(VMDied, match="connection closed"):
            await c.call(P.PING)
        with pytest.raises(VMDied):
            await c.call(P.PING)

    run_scenario(guest, body)


def test_reply_with_unknown_id_is_dropped() -> None:
    """Replies for ids nobody asked about are counted and ignored, never delivered."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send({"t": P.OK, "id": req.id + 1000, "bogus": True})
        await g.send({"t": P.READY, "id": 0})
        await g.send({"t": "exec", "id": req.id})  # a request type is not a reply
        await g.reply(req, real=True)

    frame, client, _ = run_scenario(guest, lambda c: c.call(P.PING))
    assert frame.header.get("real") is True
    assert client.dropped_frames == 3


def test_only_unknown_ids_times_out() -> None:
    """If the guest never answers the right id, the call times out (CommandTimeout)."""

    async def guest(g: Guest) -> None:
        while True:
            req = await g.recv()
            await g.send({"t": P.OK, "id": req.id + 7})

    exc, client = expect(CommandTimeout, guest, lambda c: c.call(P.PING, timeout=0.3))
    assert "did not answer" in str(exc)
    assert client.dropped_frames >= 1


# --------------------------------------------------------------------------- exec


def exec_ok(req: P.Frame, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "t": P.OK,
        "id": req.id,
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "truncated": {"stdout": False, "stderr": False},
        "duration": 0.1,
    }
    base.update(fields)
    return base


def test_exec_collects_output() -> None:
    """OUT frames are assembled per stream; the request carries argv/env/limit."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        assert req.payload == b"in"
        await g.send({"t": P.STARTED, "id": req.id, "pid": 42})
        await g.send({"t": P.OUT, "id": req.id, "stream": "stdout"}, b"hel")
        await g.send({"t": P.OUT, "id": req.id, "stream": "stderr"}, b"oops")
        await g.send({"t": P.OUT, "id": req.id, "stream": "stdout"}, b"lo")
        await g.send(exec_ok(req, exit_code=3))

    seen: list[tuple[str, bytes]] = []

    async def body(c: AgentClient) -> ExecResult:
        return await c.exec(
            ["echo", "hi"],
            env={"A": "1"},
            cwd="/w",
            user="root",
            stdin=b"in",
            timeout=9,
            output_limit=100,
            on_output=lambda s, d: seen.append((s, d)),
        )

    r, _, g = run_scenario(guest, body)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"hello", b"oops")
    assert not (r.truncated_stdout or r.truncated_stderr or r.timed_out)
    assert seen == [("stdout", b"hel"), ("stderr", b"oops"), ("stdout", b"lo")]
    h = g.received[0].header
    assert (h["argv"], h["env"], h["cwd"], h["user"], h["timeout"], h["output_limit"]) == (
        ["echo", "hi"],
        {"A": "1"},
        "/w",
        "root",
        9,
        100,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"exit_code": "0"},
        {"exit_code": None},
        {"exit_code": 1.5},
        {"timed_out": "no"},
        {"signal": "KILL"},
        {"truncated": {"stdout": "yes"}},
        {"truncated": []},
        {"duration": "fast"},
    ],
    ids=lambda d: next(iter(d)) + "=" + repr(next(iter(d.values()))),
)
def test_exec_result_with_wrong_types(bad: dict[str, Any]) -> None:
    """A result whose fields have the wrong types is a protocol error, not a crash."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send(exec_ok(req, **bad))

    exc, _ = expect(AgentProtocolError, guest, lambda c: c.exec(["true"]))
    assert "malformed reply" in str(exc)


def test_exec_result_missing_exit_code() -> None:
    """exit_code is required."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send({"t": P.OK, "id": req.id})

    exc, _ = expect(AgentProtocolError, guest, lambda c: c.exec(["true"]))
    assert "exit_code" in str(exc)


def test_exec_output_on_unknown_stream() -> None:
    """OUT for a stream other than stdout/stderr is a protocol error."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send({"t": P.OUT, "id": req.id, "stream": "stdlog"}, b"x")
        await g.send(exec_ok(req))

    exc, _ = expect(AgentProtocolError, guest, lambda c: c.exec(["true"]))
    assert "stdlog" in str(exc)


def test_exec_err_reply() -> None:
    """An exec refused by the guest is AgentError with its code."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send({"t": P.ERR, "id": req.id, "code": P.E_BAD_REQUEST, "message": "nope"})

    exc, _ = expect(AgentError, guest, lambda c: c.exec(["true"]))
    assert exc.data["code"] == P.E_BAD_REQUEST  # type: ignore[attr-defined]


LIMIT = 1000


async def flood(g: Guest, then_ok: bool) -> None:
    """Endless output far beyond the requested limit (the guest ignores it)."""
    req = await g.recv()
    for _ in range(200):
        for stream in ("stdout", "stderr"):
            await g.send({"t": P.OUT, "id": req.id, "stream": stream}, b"A" * 4096)
    if then_ok:
        await g.send(exec_ok(req))
    else:
        g.close()


def test_exec_output_capped_on_host() -> None:
    """Whatever the guest sends, the host keeps at most output_limit bytes per stream."""
    seen = {"stdout": 0, "stderr": 0}

    def on_output(stream: str, data: bytes) -> None:
        seen[stream] += len(data)

    r, _, _ = run_scenario(
        lambda g: flood(g, then_ok=True),
        lambda c: c.exec(["yes"], output_limit=LIMIT, on_output=on_output),
    )
    assert len(r.stdout) == LIMIT and len(r.stderr) == LIMIT
    assert seen == {"stdout": LIMIT, "stderr": LIMIT}
    # The guest claimed nothing was truncated: the host knows better.
    assert r.truncated_stdout and r.truncated_stderr


def test_exec_flood_then_close() -> None:
    """Output flood then EOF: VMDied, and the callback still never saw more than the limit."""
    seen = {"stdout": 0, "stderr": 0}

    def on_output(stream: str, data: bytes) -> None:
        seen[stream] += len(data)

    exc, _ = expect(
        VMDied,
        lambda g: flood(g, then_ok=False),
        lambda c: c.exec(["yes"], output_limit=LIMIT, on_output=on_output),
    )
    assert "closed" in str(exc)
    assert seen["stdout"] <= LIMIT and seen["stderr"] <= LIMIT


def test_exec_guest_silent_past_timeout() -> None:
    """A guest that never finishes a command: the host gives up after timeout + grace."""

    async def guest(g: Guest) -> None:
        await g.recv()
        await asyncio.sleep(HOLD)

    async def body(c: AgentClient) -> None:
        with pytest.raises(CommandTimeout):
            await c.exec(["sleep", "100"], timeout=0.1)

    import mvm.agent.client as client_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_mod, "TIMEOUT_GRACE", 0.2)
        run_scenario(guest, body)


def test_exec_argument_checks() -> None:
    """Empty argv and oversized stdin are refused before anything is sent."""

    async def guest(g: Guest) -> None:
        await g.recv()
        raise AssertionError("nothing should be sent")

    async def body(c: AgentClient) -> None:
        with pytest.raises(InvalidArgument):
            await c.exec([])
        with pytest.raises(InvalidArgument):
            await c.exec(["cat"], stdin=b"x" * (P.MAX_PAYLOAD + 1))

    _, _, g = run_scenario(guest, body)
    assert g.received == []


# --------------------------------------------------------------------------- hello


def test_hello_ignores_stale_nonce() -> None:
    """A reply echoing an old nonce (e.g. from before a snapshot) is ignored; the next wins."""

    async def guest(g: Guest) -> None:
        first = await g.recv()
        await g.reply(first, nonce="stale", version=P.PROTOCOL_VERSION)
        second = await g.recv()
        await g.reply(
            second,
            nonce=second.header["nonce"],
            version=P.PROTOCOL_VERSION,
            python="3.11.2",
            kernel="6.1",
            junk=["dropped"],
        )

    info, client, g = run_scenario(guest, lambda c: c.hello(timeout=30))
    assert info["python"] == "3.11.2" and info["kernel"] == "6.1"
    assert "junk" not in info
    assert client.info == info
    first, second = g.received
    assert first.type == second.type == P.HELLO
    assert first.header["nonce"] != second.header["nonce"]
    for h in (first.header, second.header):
        assert isinstance(h["time"], float) and len(bytes.fromhex(h["seed"])) == 32


def test_hello_version_mismatch() -> None:
    """A guest speaking another protocol version is refused with both versions named."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.reply(req, nonce=req.header["nonce"], version=99)

    exc, _ = expect(AgentProtocolError, guest, lambda c: c.hello(timeout=30))
    assert "99" in str(exc)


def test_hello_times_out_when_guest_silent() -> None:
    """No answer at all: hello retries, then raises CommandTimeout at its deadline."""

    async def guest(g: Guest) -> None:
        while True:
            await g.recv()

    exc, _ = expect(CommandTimeout, guest, lambda c: c.hello(timeout=0.5))
    assert "did not answer" in str(exc)


def test_hello_stops_when_vm_dies() -> None:
    """The alive() callback is checked between attempts."""

    async def guest(g: Guest) -> None:
        while True:
            await g.recv()

    exc, _ = expect(VMDied, guest, lambda c: c.hello(timeout=30, alive=lambda: False))
    assert "exited" in str(exc)


def test_hello_deadline_applies_to_wrong_nonces() -> None:
    """A guest that always echoes the wrong nonce cannot hold hello() past its timeout."""

    async def guest(g: Guest) -> None:
        while True:
            req = await g.recv()
            await g.reply(req, nonce="always-wrong", version=P.PROTOCOL_VERSION)

    async def body(c: AgentClient) -> None:
        with pytest.raises(CommandTimeout):
            await c.hello(timeout=0.3)

    # the scenario's bound (far above 0.3 s) is the hang check; no duration is asserted
    _, _, g = run_scenario(guest, body)
    assert len(g.received) >= 2  # it did retry with fresh nonces meanwhile
    assert len({f.header["nonce"] for f in g.received}) == len(g.received)


# --------------------------------------------------------------------------- files


def test_read_file_chunks_until_eof() -> None:
    """read_file asks for successive offsets and stops at eof."""

    async def guest(g: Guest) -> None:
        data = b"0123456789"
        while True:
            req = await g.recv()
            off = req.header["offset"]
            chunk = data[off : off + 4]
            await g.send(
                {"t": P.OK, "id": req.id, "eof": off + len(chunk) >= len(data)},
                chunk,
            )

    async def guest_small_chunks(g: Guest) -> None:
        await guest(g)

    data, _, g = run_scenario(guest_small_chunks, lambda c: c.read_file("/f"))
    assert data == b"0123456789"
    assert [f.header["offset"] for f in g.received] == [0, 4, 8]


def test_read_file_endless_guest_hits_limit() -> None:
    """A guest that never says eof cannot make the host buffer more than the limit."""

    async def guest(g: Guest) -> None:
        while True:
            req = await g.recv()
            await g.send({"t": P.OK, "id": req.id, "eof": False}, b"z" * 4096)

    exc, _ = expect(AgentError, guest, lambda c: c.read_file("/f", limit=10_000))
    assert exc.data["code"] == P.E_TOO_LARGE  # type: ignore[attr-defined]


def test_write_file_chunks() -> None:
    """write_file splits data into MAX_PAYLOAD chunks; only the first truncates."""
    data = b"w" * (P.MAX_PAYLOAD + 10)

    async def guest(g: Guest) -> None:
        while True:
            req = await g.recv()
            await g.reply(req, size=req.header["offset"] + len(req.payload))

    size, _, g = run_scenario(guest, lambda c: c.write_file("/f", data, mode=0o600, owner="root"))
    assert size == len(data)
    assert [(f.header["offset"], f.header["truncate"], len(f.payload)) for f in g.received] == [
        (0, True, P.MAX_PAYLOAD),
        (P.MAX_PAYLOAD, False, 10),
    ]
    assert g.received[0].header["mode"] == 0o600 and g.received[0].header["owner"] == "root"


def test_list_dir_and_stat_validate_replies() -> None:
    """Good listings convert to Entry/Stat; malformed ones are protocol errors."""
    good = {"name": "a", "type": "file", "size": 1, "mode": 420, "mtime": 1.5}

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.reply(req, entries=[good])
        req = await g.recv()
        await g.reply(req, entries=[{**good, "size": "big"}])
        req = await g.recv()
        await g.reply(req, type="dir", size=0, mode=493, mtime=2.0)
        req = await g.recv()
        await g.reply(req, type="dir")

    async def body(c: AgentClient) -> tuple[list[Entry], Stat]:
        entries = await c.list_dir("/")
        with pytest.raises(AgentProtocolError, match=r"fs\.list"):
            await c.list_dir("/")
        st = await c.stat("/")
        with pytest.raises(AgentProtocolError, match=r"fs\.stat"):
            await c.stat("/")
        return entries, st

    (entries, st), _, _ = run_scenario(guest, body)
    assert entries == [Entry(name="a", type="file", size=1, mode=420, mtime=1.5)]
    assert st == Stat(type="dir", size=0, mode=493, mtime=2.0)


def test_simple_fs_calls_send_expected_headers() -> None:
    """mkdir/remove/move/ping send the documented fields."""

    async def guest(g: Guest) -> None:
        while True:
            await g.reply(await g.recv())

    async def body(c: AgentClient) -> None:
        await c.mkdir("/d", parents=True)
        await c.remove("/d", recursive=True)
        await c.move("/a", "/b")
        await c.ping()

    _, _, g = run_scenario(guest, body)
    got = [
        (f.type, {k: v for k, v in f.header.items() if k not in ("t", "id")}) for f in g.received
    ]
    assert got == [
        (P.FS_MKDIR, {"path": "/d", "parents": True}),
        (P.FS_REMOVE, {"path": "/d", "recursive": True}),
        (P.FS_MOVE, {"path": "/a", "dest": "/b"}),
        (P.PING, {}),
    ]


# --------------------------------------------------------------------------- close


def test_close_right_after_a_reply_returns() -> None:
    """close() straight after a finished request must return while the guest is still up."""

    async def guest(g: Guest) -> None:
        req = await g.recv()
        await g.send(exec_ok(req))
        await asyncio.sleep(HOLD)  # the VM is still running: the socket stays open

    async def main() -> None:
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        greader, gwriter = await asyncio.open_unix_connection(sock=guest_sock)
        g = Guest(greader, gwriter)
        client = AgentClient(reader, writer)
        gtask = asyncio.create_task(_guarded(guest(g)))

        async def flow() -> int:
            # What oneshot.run_once does: await exec, then leave `async with` -> close().
            result = await client.exec(["true"])
            await client.close()
            return result.exit_code

        task = asyncio.create_task(flow())
        done, _ = await asyncio.wait({task}, timeout=SCENARIO_TIMEOUT)
        gtask.cancel()
        g.close()  # unblocks a hung close() so the event loop can shut down
        await asyncio.wait({task}, timeout=2.0)
        if not done:
            raise TimeoutError(f"exec + close() did not return within {SCENARIO_TIMEOUT}s")
        assert task.result() == 0

    asyncio.run(main())
