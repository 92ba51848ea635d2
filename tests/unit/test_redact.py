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


def test_held_tail_is_bounded() -> None:
    s = Redactor({"k": "x" * 10}).stream()
    out = s.feed(b"a" * 1000)
    assert len(out) == 1000 - 9


def test_logging_filter_redacts_known_values() -> None:
    reg = KnownSecrets()
    reg.add({"tok": "hunter22"})
    rec = logging.LogRecord("t", logging.INFO, __file__, 1, "failed with %s", ("hunter22",), None)
    assert RedactingFilter(reg).filter(rec)
    assert rec.getMessage() == "failed with [REDACTED:tok]"
