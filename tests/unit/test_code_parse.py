"""The pure parts of run_code and the MCP adapter: splitting the client's stdout from its
result record (streaming), parsing a hostile record, names, and the HTTP token guard."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.errors import InvalidArgument, MvmError
from mvm.mcp.server import bearer_guard, client_name, parse_http
from mvm.mcp.tools import MAX_TEXT, clip
from mvm.sdk.code import CodeContext, Splitter, build_result, parse_bundle, parse_record, resolve

MARKER = b"\x1eMVMCODE:abc\n"


@given(
    out=st.binary(max_size=300).filter(lambda b: MARKER not in b + MARKER[:-1]),
    record=st.binary(max_size=100),
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=8),
)
def test_splitter_any_chunking(out: bytes, record: bytes, cuts: list[int]) -> None:
    data = out + MARKER + record
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    s = Splitter(MARKER)
    shown = b"".join(s.feed(c) for c in chunks)
    assert s.found
    assert shown == out == bytes(s.out)
    assert bytes(s.record) == record


def test_splitter_without_marker_keeps_everything() -> None:
    s = Splitter(MARKER)
    assert s.feed(b"abc\x1eMVM") == b"abc"  # a possible marker start is held back
    assert s.end() == b"\x1eMVM"
    assert not s.found and bytes(s.out) == b"abc\x1eMVM"


def test_parse_bundle_is_strict() -> None:
    png = base64.b64encode(b"\x89PNG").decode()
    got = parse_bundle({"image/png": png, "text/plain": "x", "bad": 5, 7: "y"})
    assert got == {"image/png": b"\x89PNG", "text/plain": "x"}
    assert parse_bundle({"image/png": "!!not base64"}) == {}
    assert parse_bundle(["not", "a", "dict"]) == {}


def test_build_result_from_a_hostile_record() -> None:
    rec: dict[str, Any] = {
        "status": "pwned",
        "error": {"name": 5, "value": "v", "traceback": ["no"]},
        "outputs": "nope",
        "value": {"text/plain": "1", "text/html": "<b>1</b>"},
        "exec_count": True,
        "timed_out": 1,
    }
    res = build_result(rec, "c", "python", b"o", b"e", None)
    assert res.status == "error"
    assert res.error is not None and res.error.name == "" and res.error.traceback == ""
    assert res.text == "1" and res.outputs == [{"text/plain": "1", "text/html": "<b>1</b>"}]
    assert res.exec_count is None and res.timed_out
    with pytest.raises(MvmError):
        parse_record(b"not json\n")


def test_resolve_contexts() -> None:
    assert resolve(None, "bash") == ("bash", "bash")
    assert resolve(CodeContext("py-1", "python"), "bash") == ("py-1", "python")
    for bad in ("../x", "A", "", "x" * 64):
        with pytest.raises(InvalidArgument):
            resolve(bad, "python")
    with pytest.raises(InvalidArgument):
        resolve(None, "cobol")


def test_clip_notes_truncation() -> None:
    assert clip("short") == "short"
    long = clip("x" * (MAX_TEXT + 10))
    assert long.startswith("x" * MAX_TEXT) and "10 more characters" in long


def test_parse_http_loopback_only() -> None:
    assert parse_http("127.0.0.1:8765") == ("127.0.0.1", 8765)
    for bad in ("0.0.0.0:80", "8765", "127.0.0.1:99999", "example.org:80"):
        with pytest.raises(InvalidArgument):
            parse_http(bad)


def test_client_name_is_cleaned() -> None:
    assert client_name(None) == "unknown"


def test_bearer_guard() -> None:
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    guarded = bearer_guard(app, "tok")
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def go(headers: list[tuple[bytes, bytes]]) -> None:
        await guarded({"type": "http", "headers": headers}, None, send)

    asyncio.run(go([]))
    asyncio.run(go([(b"authorization", b"Bearer wrong")]))
    assert calls == [] and [m.get("status") for m in sent if "status" in m] == [401, 401]
    asyncio.run(go([(b"authorization", b"Bearer tok")]))
    assert calls == ["http"]


def test_initramfs_ships_the_code_programs() -> None:
    from mvm.images import initramfs
    from mvm.sdk.code import client_script

    src = initramfs.code_sources()
    assert set(src) == {"code_server.py", "code_output.py", "code_bash.py", "code_node.py"}
    assert b"class Server" in src["code_server.py"] and b"MVMCODE:" in src["code_output.py"]
    # the per-cell client travels in the exec's argv, as package data of the SDK
    assert "MVMCODE:" in client_script() and client_script().startswith("# run_code")
    assert b"/run/mvm-code" in initramfs.init_script()
