"""Redaction: one-shot and streaming forms agree, and no value survives a chunk split."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from mvm.redact import KnownSecrets, RedactingFilter, Redactor, marker

values = st.binary(min_size=1, max_size=12)
secret_maps = st.dictionaries(
    st.from_regex(r"[a-z]{1,6}", fullmatch=True), values, min_size=1, max_size=4
)


#: Values over a two-letter alphabet: prefixes of one another, overlaps, repeats.
ab_values = st.lists(st.sampled_from([b"a", b"b"]), min_size=1, max_size=6).map(b"".join)
ab_maps = st.dictionaries(st.sampled_from(["x", "y", "z"]), ab_values, min_size=1)


@settings(max_examples=500)
@given(ab_maps, st.lists(ab_values, max_size=10), st.lists(st.integers(0, 80), max_size=8))
def test_stream_equals_batch_with_overlapping_values(
    secrets: dict[str, bytes], parts: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(parts)
    r = Redactor(secrets)
    s = r.stream()
    streamed = b"".join(s.feed(c) for c in chunked(data, cuts)) + s.flush()
    assert streamed == r.redact_bytes(data)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def test_replaces_value_with_its_name() -> None:
    r = Redactor({"api-key": "sk-12345"})
    assert r.redact_bytes(b"key=sk-12345!") == b"key=[REDACTED:api-key]!"
    assert r.redact_text("sk-12345 and sk-12345") == "[REDACTED:api-key] and [REDACTED:api-key]"


def test_longest_first() -> None:
    r = Redactor({"short": "abcd", "long": "abcdefgh"})
    assert r.redact_bytes(b"xabcdefghx abcd") == b"x[REDACTED:long]x [REDACTED:short]"


def test_no_secrets_passthrough() -> None:
    r = Redactor({})
    assert not r
    s = r.stream()
    assert s.feed(b"abc") + s.flush() == b"abc"


def test_split_across_chunks_is_caught() -> None:
    s = Redactor({"k": "supersecret"}).stream()
    out = s.feed(b"hello super") + s.feed(b"secret world") + s.flush()
    assert out == b"hello [REDACTED:k] world"


@settings(max_examples=300)
@given(
    secret_maps,
    st.lists(st.binary(max_size=10) | values, max_size=8),
    st.lists(st.integers(0, 200), max_size=6),
)
def test_stream_equals_batch(
    secrets: dict[str, bytes], parts: list[bytes], cuts: list[int]
) -> None:
    # Mix secret values into the text so matches actually happen.
    vals = list(secrets.values())
    data = b"".join(p + vals[i % len(vals)] for i, p in enumerate(parts))
    r = Redactor(secrets)
    s = r.stream()
    streamed = b"".join(s.feed(c) for c in chunked(data, cuts)) + s.flush()
    assert streamed == r.redact_bytes(data)


@settings(max_examples=300)
@given(
    st.binary(min_size=4, max_size=16).filter(lambda v: b"[" not in v and b"]" not in v),
    st.binary(max_size=40),
    st.lists(st.integers(0, 200), max_size=6),
)
def test_value_never_survives(value: bytes, noise: bytes, cuts: list[int]) -> None:
    data = noise + value + noise + value
    r = Redactor({"s": value})
    s = r.stream()
    out = b"".join(s.feed(c) for c in chunked(data, cuts)) + s.flush()
    # The value has no brackets, so it can only hide between markers: it must not.
    assert marker("s").encode() in out
    for piece in out.split(marker("s").encode()):
        assert value not in piece


def test_holds_only_a_possible_secret_start() -> None:
    s = Redactor({"k": "abcdefghij"}).stream()
    assert s.feed(b"ready\n") == b"ready\n"  # cannot start a secret: not delayed
    assert s.feed(b"zzz abcde") == b"zzz "
    assert s.feed(b"fghij!") == b"[REDACTED:k]!"
    assert s.feed(b"abc") == b""
    assert s.flush() == b"abc"


@given(st.binary(max_size=200))
def test_held_tail_is_bounded(data: bytes) -> None:
    r = Redactor({"k": b"\x00\x01" * 5})
    s = r.stream()
    s.feed(data)
    assert len(s._held) <= r.max_len - 1


def test_logging_filter_redacts_known_values() -> None:
    reg = KnownSecrets()
    reg.add({"tok": "hunter22"})
    rec = logging.LogRecord("t", logging.INFO, __file__, 1, "failed with %s", ("hunter22",), None)
    assert RedactingFilter(reg).filter(rec)
    assert rec.getMessage() == "failed with [REDACTED:tok]"
