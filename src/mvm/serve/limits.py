"""Per-address rate limits for `mvmctl serve` (pure: time is passed in).

Two token buckets per source address: one for all requests, one for failed
authentications (an address that keeps guessing tokens gets 429 for everything
until its bucket refills). The table is bounded: the oldest addresses are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """``rate`` tokens a second, at most ``burst`` saved, per key."""

    rate: float
    burst: float
    max_keys: int = 10_000
    _table: OrderedDict[str, Bucket] = field(default_factory=OrderedDict)

    def _bucket(self, key: str, now: float) -> Bucket:
        b = self._table.get(key)
        if b is None:
            b = Bucket(tokens=self.burst, stamp=now)
            self._table[key] = b
            while len(self._table) > self.max_keys:
                self._table.popitem(last=False)
        else:
            self._table.move_to_end(key)
            b.tokens = min(self.burst, b.tokens + max(0.0, now - b.stamp) * self.rate)
            b.stamp = now
        return b

    def take(self, key: str, now: float) -> bool:
        """Spend one token of ``key``; False when it has none left."""
        b = self._bucket(key, now)
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def has(self, key: str, now: float) -> bool:
        """Whether ``key`` still has a token (without spending it)."""
        return self._bucket(key, now).tokens >= 1.0
