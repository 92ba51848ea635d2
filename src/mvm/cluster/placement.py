"""Where a new sandbox goes: a pure function of the hosts' last reported capacity.

Kept free of Ray and I/O so it is tested exhaustively (tests/unit/test_cluster_placement.py).
Rules, in order: only live hosts not excluded (a host that just failed this create) with
room for the memory asked; a host holding a warm boot template of the shape first (its
create is a restore, not a boot); then spread (fewest sandboxes, most free memory) or,
with the ``pack`` policy, fill the busiest host that still fits. Ties go by name, so the
answer is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["spread", "pack"]
POLICIES: tuple[Policy, ...] = ("spread", "pack")
#: Memory a host keeps for itself beyond what its sandboxes ask (MiB).
RESERVE_MB = 256


@dataclass(frozen=True)
class Shape:
    image: str
    cpus: int
    memory_mb: int

    def key(self) -> str:
        return f"{self.image}/{self.cpus}/{self.memory_mb}"


@dataclass
class Capacity:
    """One host as its actor last reported it (plus what the front placed since)."""

    name: str
    alive: bool = True
    free_mb: int = 0
    vcpus: int = 1
    running: int = 0
    images: list[str] = field(default_factory=list)
    warm: list[str] = field(default_factory=list)  # Shape.key() of each warm template

    def fits(self, shape: Shape) -> bool:
        return self.free_mb - RESERVE_MB >= shape.memory_mb


def rank(
    hosts: list[Capacity],
    shape: Shape,
    *,
    policy: Policy = "spread",
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    """Host names to try for ``shape``, best first (empty: nowhere fits)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}")
    ok = [h for h in hosts if h.alive and h.name not in exclude and h.fits(shape)]
    key = shape.key()

    def score(h: Capacity) -> tuple[int, int, int, str]:
        warm = 0 if key in h.warm else 1
        if policy == "pack":
            return (warm, -h.running, h.free_mb, h.name)
        return (warm, h.running, -h.free_mb, h.name)

    return [h.name for h in sorted(ok, key=score)]
