"""The Connect envelope codec of the E2B face: round trips, any chunking, bounded."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.e2b import connect as C

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.lists(JSON, max_size=6), st.data())
def test_frames_survive_any_chunking(msgs: list[Any], data: st.DataObject) -> None:
    wire = b"".join(C.encode(m) for m in msgs) + C.end_frame()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    d = C.Decoder()
    got: list[tuple[int, Any]] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += d.feed(wire[prev:cut])
        prev = cut
    assert d.pending == 0
    assert [m for _, m in got[:-1]] == msgs
    assert got[-1] == (C.FLAG_END, {})
    assert all(f == 0 for f, _ in got[:-1])


def test_end_frame_carries_an_error() -> None:
    [(flags, msg)] = C.decode_all(C.end_frame("not_found", "no such file"))
    assert flags == C.FLAG_END
    assert msg == {"error": {"code": "not_found", "message": "no such file"}}
    with pytest.raises(ValueError):
        C.end_frame("bogus")


@pytest.mark.parametrize(
    "wire",
    [
        struct.pack(">BI", 1, 2) + b"{}",  # compressed
        struct.pack(">BI", 0x80, 2) + b"{}",  # unknown flag
        struct.pack(">BI", 0, C.MAX_MESSAGE + 1),  # too big
        struct.pack(">BI", 0, 3) + b"{x}",  # not JSON
        struct.pack(">BI", 0, 10) + b"{}",  # truncated
    ],
)
def test_bad_frames_are_refused(wire: bytes) -> None:
    with pytest.raises(C.EnvelopeError):
        C.decode_all(wire)


def test_wire_format_is_flags_length_json() -> None:
    assert (
        C.encode({"a": 1})
        == b"\x00\x00\x00\x00\x07" + json.dumps({"a": 1}, separators=(",", ":")).encode()
    )
