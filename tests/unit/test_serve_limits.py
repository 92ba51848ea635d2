"""Per-address token buckets of `mvmctl serve` (time is given, so nothing sleeps)."""

from __future__ import annotations

from mvm.serve.app import is_wildcard, parse_listen
from mvm.serve.limits import RateLimiter


def test_bucket_spends_then_refills() -> None:
    r = RateLimiter(rate=1.0, burst=3.0)
    assert [r.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert r.take("b", 0.0)  # another address has its own bucket
    assert not r.has("a", 0.5)
    assert r.take("a", 1.0)


def test_table_is_bounded() -> None:
    r = RateLimiter(rate=1.0, burst=1.0, max_keys=10)
    for i in range(100):
        r.take(str(i), 0.0)
    assert len(r._table) == 10


def test_listen_parsing() -> None:
    assert parse_listen("127.0.0.1:3000") == ("127.0.0.1", 3000)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert is_wildcard("0.0.0.0") and is_wildcard("::") and not is_wildcard("127.0.0.1")
