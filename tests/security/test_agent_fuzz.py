"""Thousands of malformed frames against the real guest agent over its real port.

tests/integration/test_robustness.py sends a fixed list of garbage; this drives the same
channel with hypothesis: well-framed requests whose fields have random types and values,
frames with lying length fields, random header bytes, garbage between frames. The guest
agent must answer what it can with ``err`` (or ignore it), never send the host a frame
the strict host decoder refuses, and keep serving.

Requests that would change the guest (writes, removes, signals, shutdown, starting
processes) are left out: their parsing is the same code, and a random ``rm -r`` would
only test the fuzzer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.vm import MicroVM
from tests.integration.conftest import LoopThread

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("run_dir_env")]

Call = Callable[..., Any]
EXAMPLES = 2000
CHECK_EVERY = 250

SAFE_TYPES = [
    P.PING,
    P.HELLO,
    P.FS_READ,
    P.FS_LIST,
    P.FS_STAT,
    P.PROC_LIST,
    P.PROC_WAIT,
    P.PROC_OUTPUT,
    P.STDIN,
    P.EXEC,
    "no.such",
    "",
    "ok",
    "err",
    "ready",
    "event",
]
FIELDS = [
    "path",
    "offset",
    "length",
    "argv",
    "env",
    "cwd",
    "user",
    "timeout",
    "output_limit",
    "ref",
    "proc",
    "stream",
    "nonce",
    "time",
    "seed",
    "version",
    "recursive",
    "owner",
    "mode",
    "eof",
]
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.sampled_from(["/", "/proc/self/mem", "..", "\x00", "/etc/../etc/passwd", "x" * 5000]),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
# High ids: replies can never collide with the host's own request ids.
IDS = st.one_of(st.integers(min_value=2**40, max_value=2**53 - 1), JSON)


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    h: dict[str, Any] = draw(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6))
    t = draw(st.sampled_from(SAFE_TYPES))
    if t == P.EXEC:
        h["argv"] = ["true"]  # the request's other fields stay random
    if t == P.FS_READ:
        h.setdefault("length", 16)
        if not isinstance(h.get("path"), str) or h["path"].startswith("/dev"):
            h["path"] = "/etc/hostname"  # never a device that blocks a reader forever
    if draw(st.booleans()):
        h["t"] = t
    h["id"] = draw(IDS)
    return h


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    header = json.dumps(draw(headers())).encode()[: P.MAX_HEADER]
    payload = draw(st.binary(max_size=512))
    how = draw(st.sampled_from(["ok", "ok", "body_len", "head_len", "raw_head", "prefix", "cut"]))
    body_len, head_len = 4 + len(header) + len(payload), len(header)
    if how == "body_len":
        body_len = draw(st.integers(min_value=0, max_value=2**32 - 1))
    elif how == "head_len":
        head_len = draw(st.integers(min_value=0, max_value=2**32 - 1))
    elif how == "raw_head":
        header = draw(st.binary(max_size=64))
        body_len, head_len = 4 + len(header) + len(payload), len(header)
    frame = P.MAGIC + struct.pack(">II", body_len, head_len) + header + payload
    if how == "prefix":
        frame = draw(st.binary(max_size=64)).replace(b"MVM", b"mvm") + frame
    elif how == "cut":
        frame = frame[: draw(st.integers(min_value=0, max_value=len(frame)))]
    return frame


@pytest.fixture(scope="module")
def fuzz_vm(start_vm: Callable[..., MicroVM], loop_thread: LoopThread) -> Iterator[MicroVM]:
    vm = start_vm()
    try:
        yield vm
    finally:
        loop_thread.call(vm.destroy(), timeout=30)


async def write_raw(agent: AgentClient, data: bytes) -> None:
    agent._writer.write(data)
    await agent._writer.drain()


async def still_serving(agent: AgentClient) -> None:
    # Zeros complete any frame a lying length left open (the guest then resyncs on MAGIC).
    await write_raw(agent, bytes(P.MAX_BODY + 64))
    await agent.hello(60)
    r = await agent.exec(["echo", "alive"], timeout=30)
    assert (r.exit_code, r.stdout) == (0, b"alive\n")


def test_thousands_of_malformed_frames_leave_the_agent_serving(
    call: Call, fuzz_vm: MicroVM
) -> None:
    agent = fuzz_vm.require_agent()
    sent = {"frames": 0, "bytes": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(frames(), min_size=1, max_size=4))
    def probe(batch: list[bytes]) -> None:
        data = b"".join(batch)
        call(write_raw(agent, data), timeout=30)
        sent["frames"] += len(batch)
        sent["bytes"] += len(data)
        if sent["frames"] // CHECK_EVERY != (sent["frames"] - len(batch)) // CHECK_EVERY:
            call(still_serving(agent), timeout=120)
            assert agent.failure is None, agent.failure

    probe()
    call(still_serving(agent), timeout=120)
    print(
        f"sent {sent['frames']} frames ({sent['bytes']} bytes); host dropped "
        f"{agent.dropped_frames} unasked-for replies"
    )
    assert sent["frames"] >= EXAMPLES
    assert agent.failure is None  # the guest never sent the host a malformed frame
    assert fuzz_vm.qemu.alive()
