"""Framing shared by host and guest: round trips, strict failures, lenient recovery."""

from __future__ import annotations

import itertools
import json
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mvm.agent import protocol as P

# --------------------------------------------------------------------------- helpers


class Hang(Exception):
    """The code under test spun without returning (raised by cpu_limit)."""


@contextmanager
def cpu_limit(seconds: float) -> Iterator[None]:
    """Raise Hang once the process has burnt ``seconds`` of CPU inside the block.

    Uses ITIMER_VIRTUAL / SIGVTALRM so it does not disturb pytest-timeout's SIGALRM.
    The decoder is pure CPU, so a busy loop in it trips this quickly.
    """

    def on_timer(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no result after {seconds}s of CPU")

    old = signal.signal(signal.SIGVTALRM, on_timer)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def raw_frame(header: bytes, payload: bytes = b"", *, magic: bytes = P.MAGIC) -> bytes:
    """A frame built by hand, so the header bytes can be anything."""
    body_len = 4 + len(header) + len(payload)
    return magic + struct.pack(">II", body_len, len(header)) + header + payload


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given (unsorted, possibly repeated) offsets."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(dec: P.FrameDecoder, chunks: list[bytes]) -> list[P.Frame]:
    out: list[P.Frame] = []
    for c in chunks:
        out += dec.feed(c)
    return out


# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
valid_ids = st.integers(min_value=0, max_value=2**53 - 1)
headers = st.builds(
    lambda extra, t, i: {**extra, "t": t, "id": i},
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.text(min_size=1, max_size=16),
    valid_ids,
)
payloads = st.binary(max_size=2048)


# --------------------------------------------------------------------------- round trip


@given(
    frames=st.lists(st.tuples(headers, payloads), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20),
    strict=st.booleans(),
)
@settings(max_examples=200)
def test_round_trip_any_chunking(
    frames: list[tuple[dict[str, Any], bytes]], cuts: list[int], strict: bool
) -> None:
    """Whatever the chunk boundaries, the decoder returns exactly the frames encoded."""
    wire = b"".join(P.encode(h, p) for h, p in frames)
    dec = P.FrameDecoder(strict=strict)
    got = feed_all(dec, chunked(wire, cuts))
    assert [(f.header, f.payload) for f in got] == frames
    assert dec.buffered == 0
    assert dec.errors == 0


def test_round_trip_byte_by_byte() -> None:
    """One byte at a time is the worst case for partial prefixes and headers."""
    h = {"t": "exec", "id": 7, "argv": ["echo", "ü"], "env": {"A": "b"}}
    wire = P.encode(h, b"\x00\xffpayload") * 2
    dec = P.FrameDecoder()
    got = feed_all(dec, [wire[i : i + 1] for i in range(len(wire))])
    assert [(f.header, f.payload) for f in got] == [(h, b"\x00\xffpayload")] * 2


def test_frame_properties() -> None:
    """Frame.type and Frame.id fall back safely when the header lies about them."""
    assert P.Frame({"t": "ok", "id": 3}).type == "ok"
    assert P.Frame({"t": "ok", "id": 3}).id == 3
    assert P.Frame({"t": 5, "id": True}).type == ""
    assert P.Frame({"t": "x", "id": True}).id == -1
    assert P.Frame({"t": "x", "id": "3"}).id == -1


def test_encode_layout() -> None:
    """The wire layout is MAGIC | body length | header length | header | payload."""
    data = P.encode({"t": "ping", "id": 1}, b"xyz")
    head = b'{"t":"ping","id":1}'
    assert data[:4] == P.MAGIC
    assert struct.unpack(">II", data[4:12]) == (4 + len(head) + 3, len(head))
    assert data[12:] == head + b"xyz"


def test_encode_escapes_non_ascii() -> None:
    """Headers are sent as ASCII JSON, so any str survives (even lone surrogates)."""
    h = {"t": "x", "id": 1, "name": "é\udcff界"}
    data = P.encode(h)
    assert data[12:].isascii()
    assert P.FrameDecoder().feed(data)[0].header == h


def test_encode_limits() -> None:
    """encode refuses frames a reader would reject, exactly at the limits."""
    P.encode({"t": "x"}, b"\0" * P.MAX_PAYLOAD)  # at the limit: fine
    with pytest.raises(P.FrameError, match="payload"):
        P.encode({"t": "x"}, b"\0" * (P.MAX_PAYLOAD + 1))
    base = len(json.dumps({"t": "x", "s": ""}, separators=(",", ":")))
    P.encode({"t": "x", "s": "a" * (P.MAX_HEADER - base)})
    with pytest.raises(P.FrameError, match="header"):
        P.encode({"t": "x", "s": "a" * (P.MAX_HEADER - base + 1)})


def test_largest_frame_decodes() -> None:
    """A frame at both limits at once is still accepted by a default decoder."""
    base = len(json.dumps({"t": "x", "s": ""}, separators=(",", ":")))
    h = {"t": "x", "s": "a" * (P.MAX_HEADER - base)}
    data = P.encode(h, b"\1" * P.MAX_PAYLOAD)
    assert len(data) == P.MAX_BODY + 8
    (frame,) = P.FrameDecoder().feed(data)
    assert frame.header == h and len(frame.payload) == P.MAX_PAYLOAD


# --------------------------------------------------------------------------- strict


BAD_STREAMS = {
    "oversized body": P.MAGIC + struct.pack(">II", P.MAX_BODY + 1, 2) + b"{}",
    "huge body": P.MAGIC + struct.pack(">II", 0xFFFFFFFF, 2),
    "bad magic": b"MVM2" + struct.pack(">II", 6, 2) + b"{}",
    "garbage": b"GET / HTTP/1.1\r\n\r\n",
    "header longer than body": P.MAGIC + struct.pack(">II", 10, 7) + b"{}{}{}{}",
    "header too large": P.MAGIC + struct.pack(">II", P.MAX_HEADER + 100, P.MAX_HEADER + 1),
    "invalid json": raw_frame(b"{not json"),
    "json array": raw_frame(b'[{"t":"ok","id":1}]'),
    "json string": raw_frame(b'"ok"'),
    "json null": raw_frame(b"null"),
    "missing t": raw_frame(b'{"id":1}'),
    "empty t": raw_frame(b'{"t":"","id":1}'),
    "t not a string": raw_frame(b'{"t":1,"id":1}'),
    "bool id": raw_frame(b'{"t":"ok","id":true}'),
    "negative id": raw_frame(b'{"t":"ok","id":-1}'),
    "huge id": raw_frame(b'{"t":"ok","id":9007199254740992}'),
    "float id": raw_frame(b'{"t":"ok","id":1.0}'),
    "string id": raw_frame(b'{"t":"ok","id":"1"}'),
    "invalid utf-8": raw_frame(b'{"t":"ok\xff\xfe","id":1}'),
    "deep nesting": raw_frame(b"[" * 50000 + b"]" * 50000),
    "too many digits": raw_frame(b'{"t":"ok","id":1,"x":' + b"9" * 5000 + b"}"),
}


@pytest.mark.parametrize("stream", list(BAD_STREAMS.values()), ids=list(BAD_STREAMS))
def test_strict_rejects_and_stays_broken(stream: bytes) -> None:
    """The host decoder raises on the first violation and refuses everything after it."""
    dec = P.FrameDecoder(strict=True)
    with pytest.raises(P.FrameError) as first:
        dec.feed(stream)
    assert str(first.value)
    assert dec.buffered == 0  # the bad bytes are not kept around
    with pytest.raises(P.FrameError) as again:
        dec.feed(P.encode({"t": "ok", "id": 1}))
    assert str(again.value) == str(first.value)


def test_strict_error_messages() -> None:
    """The messages say what was wrong (they end up in AgentProtocolError)."""
    cases = {
        "exceeds": BAD_STREAMS["oversized body"],
        "bad magic": BAD_STREAMS["bad magic"],
        "bad header length": BAD_STREAMS["header longer than body"],
        "not valid JSON": BAD_STREAMS["invalid utf-8"],
        "not a JSON object": BAD_STREAMS["json array"],
        "no message type": BAD_STREAMS["missing t"],
        "'id'": BAD_STREAMS["negative id"],
    }
    for needle, stream in cases.items():
        with pytest.raises(P.FrameError, match=needle):
            P.FrameDecoder().feed(stream)


def test_strict_rejects_oversized_prefix_before_body_arrives() -> None:
    """A hostile length prefix is refused from the 12-byte prefix alone (no buffering)."""
    dec = P.FrameDecoder()
    with pytest.raises(P.FrameError, match="exceeds"):
        dec.feed(P.MAGIC + struct.pack(">II", P.MAX_BODY + 1, 4))


def test_strict_bad_magic_detected_on_first_byte() -> None:
    """A single wrong first byte is already fatal: no waiting for a full prefix."""
    with pytest.raises(P.FrameError, match="bad magic"):
        P.FrameDecoder().feed(b"X")


def test_strict_keeps_frames_before_the_error_out() -> None:
    """Frames fully before the violation are not returned (the feed raises), state is broken."""
    dec = P.FrameDecoder()
    with pytest.raises(P.FrameError):
        dec.feed(P.encode({"t": "ok", "id": 1}) + b"junkjunkjunkjunk")
    with pytest.raises(P.FrameError):
        dec.feed(b"")


def test_strict_reset_recovers() -> None:
    """reset() is the only way out of the broken state."""
    dec = P.FrameDecoder()
    with pytest.raises(P.FrameError):
        dec.feed(b"nope")
    dec.reset()
    assert dec.feed(P.encode({"t": "ok", "id": 2})) == [P.Frame({"t": "ok", "id": 2})]


def test_partial_prefix_waits() -> None:
    """A partial MAGIC or prefix is not an error: the decoder waits for more."""
    dec = P.FrameDecoder()
    data = P.encode({"t": "ok", "id": 1}, b"p")
    for i in range(len(data) - 1):
        dec.reset()
        assert dec.feed(data[:i]) == []
        assert dec.buffered == i


def test_id_defaults_to_zero_on_the_wire() -> None:
    """A header without 'id' is accepted by the decoder (id 0 for unsolicited frames)."""
    (f,) = P.FrameDecoder().feed(raw_frame(b'{"t":"ready"}'))
    assert f.type == "ready"
    assert f.header == {"t": "ready"}


def test_max_body_is_configurable() -> None:
    """A decoder with a smaller max_body refuses frames a default one accepts."""
    data = P.encode({"t": "x", "id": 1}, b"\0" * 100)
    assert len(P.FrameDecoder().feed(data)) == 1
    with pytest.raises(P.FrameError, match="exceeds 64"):
        P.FrameDecoder(max_body=64).feed(data)


# --------------------------------------------------------------------------- lenient

no_magic_garbage = st.binary(min_size=1, max_size=200).filter(lambda b: P.MAGIC not in b)


def test_lenient_skips_undecodable_frame_and_counts_it() -> None:
    """A well-delimited frame with a bad header is dropped whole; the next frame survives."""
    good = P.encode({"t": "ping", "id": 5})
    dec = P.FrameDecoder(strict=False)
    got = dec.feed(raw_frame(b"[1,2]") + raw_frame(b"{bad") + good)
    assert got == [P.Frame({"t": "ping", "id": 5})]
    assert dec.errors == 2
    assert dec.buffered == 0


def test_lenient_skips_oversized_prefix() -> None:
    """An impossible length prefix is skipped by resynchronising on the next MAGIC."""
    good = P.encode({"t": "ping", "id": 6}, b"x")
    bad = P.MAGIC + struct.pack(">II", 0xFFFFFFFF, 0xFFFFFFFF)
    dec = P.FrameDecoder(strict=False)
    assert dec.feed(bad + good) == [P.Frame({"t": "ping", "id": 6}, b"x")]
    assert dec.errors >= 1


@given(
    garbage=no_magic_garbage, frames=st.lists(st.tuples(headers, payloads), min_size=1, max_size=3)
)
@settings(max_examples=200)
def test_lenient_recovers_frames_after_garbage_in_one_feed(
    garbage: bytes, frames: list[tuple[dict[str, Any], bytes]]
) -> None:
    """Garbage (without MAGIC) glued in front of valid frames costs nothing but the garbage."""
    dec = P.FrameDecoder(strict=False)
    wire = garbage + b"".join(P.encode(h, p) for h, p in frames)
    with cpu_limit(0.3):
        got = dec.feed(wire)
    assert [(f.header, f.payload) for f in got] == frames
    assert dec.errors >= 1
    assert dec.buffered == 0


def test_lenient_decoder_returns_on_stray_bytes() -> None:
    """Minimal reproduction: the guest's lenient reader must not spin on 1-5 stray bytes."""
    dec = P.FrameDecoder(strict=False)
    with cpu_limit(0.3):
        assert dec.feed(b"X") == []
        assert dec.feed(b"XXXXX") == []
        assert dec.feed(P.encode({"t": "ping", "id": 1})) == [P.Frame({"t": "ping", "id": 1})]


_NO_SHRINK = settings(
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
    deadline=None,
)


@given(chunks=st.lists(st.binary(max_size=64), min_size=1, max_size=8))
@settings(_NO_SHRINK, max_examples=3000)
def test_lenient_never_raises_on_garbage(chunks: list[bytes]) -> None:
    """Thousands of random byte streams: a lenient decoder never raises or spins."""
    dec = P.FrameDecoder(strict=False)
    with cpu_limit(0.3):
        for c in chunks:
            for f in dec.feed(c):
                assert isinstance(f.header, dict) and f.type
            assert dec.buffered <= P.MAX_BODY + P.PREFIX_SIZE


@given(
    prefix=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda b, h: P.MAGIC + struct.pack(">II", b, h),
                st.integers(0, 2**32 - 1),
                st.integers(0, 2**32 - 1),
            ),
            st.just(P.MAGIC[:3]),
        ),
        max_size=6,
    ),
)
@settings(_NO_SHRINK, max_examples=2000)
def test_lenient_buffer_stays_bounded(prefix: list[bytes]) -> None:
    """Garbage, truncated MAGICs and hostile prefixes never grow the buffer past one frame."""
    dec = P.FrameDecoder(strict=False)
    with cpu_limit(0.3):
        for c in prefix:
            dec.feed(c)
            assert dec.buffered <= P.MAX_BODY + P.PREFIX_SIZE


@given(
    garbage=no_magic_garbage,
    frames=st.lists(st.tuples(headers, payloads), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 14), max_size=10),
)
@settings(_NO_SHRINK, max_examples=1000)
def test_lenient_recovers_frames_after_garbage_any_chunking(
    garbage: bytes, frames: list[tuple[dict[str, Any], bytes]], cuts: list[int]
) -> None:
    """Valid frames after garbage are recovered whatever the read boundaries are."""
    dec = P.FrameDecoder(strict=False)
    wire = garbage + b"".join(P.encode(h, p) for h, p in frames)
    with cpu_limit(0.3):
        got = feed_all(dec, chunked(wire, cuts))
    assert [(f.header, f.payload) for f in got] == frames
