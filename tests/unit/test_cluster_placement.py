"""The cluster's placement core (pure): spread, pack, warm-template locality, exclusion."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.cluster.placement import RESERVE_MB, Capacity, Shape, rank

SHAPE = Shape("python", 1, 512)


def host(name: str, running: int = 0, free: int = 8000, **kw: object) -> Capacity:
    return Capacity(name=name, free_mb=free, running=running, **kw)  # type: ignore[arg-type]


def test_spread_prefers_the_emptier_host() -> None:
    assert rank([host("a", 3), host("b", 1)], SHAPE) == ["b", "a"]


def test_pack_prefers_the_busier_host_that_fits() -> None:
    assert rank([host("a", 3), host("b", 1)], SHAPE, policy="pack") == ["a", "b"]


def test_warm_template_of_the_shape_wins_over_spread() -> None:
    hs = [host("a", 5, warm=[SHAPE.key()]), host("b", 0, warm=["python/2/1024"])]
    assert rank(hs, SHAPE)[0] == "a"


def test_dead_excluded_and_full_hosts_are_never_chosen() -> None:
    hs = [
        host("dead", alive=False),
        host("failed"),
        host("full", free=SHAPE.memory_mb + RESERVE_MB - 1),
        host("ok", 9),
    ]
    assert rank(hs, SHAPE, exclude=frozenset({"failed"})) == ["ok"]
    assert rank([host("dead", alive=False)], SHAPE) == []


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        rank([host("a")], SHAPE, policy="random")  # type: ignore[arg-type]


caps = st.builds(
    Capacity,
    name=st.text("abcdefgh", min_size=1, max_size=3),
    alive=st.booleans(),
    free_mb=st.integers(0, 10_000),
    running=st.integers(0, 50),
    warm=st.lists(st.sampled_from([SHAPE.key(), "python/2/1024"]), max_size=2),
)


@given(st.lists(caps, max_size=8, unique_by=lambda c: c.name), st.sampled_from(["spread", "pack"]))
def test_rank_is_a_deterministic_ordering_of_the_eligible(
    hosts: list[Capacity], policy: str
) -> None:
    out = rank(hosts, SHAPE, policy=policy)  # type: ignore[arg-type]
    eligible = [h for h in hosts if h.alive and h.fits(SHAPE)]
    assert sorted(out) == sorted(h.name for h in eligible)
    assert out == rank(list(reversed(hosts)), SHAPE, policy=policy)
    if out:
        first = next(h for h in eligible if h.name == out[0])
        warm_any = any(SHAPE.key() in h.warm for h in eligible)
        assert (SHAPE.key() in first.warm) == warm_any
        cold = [h for h in eligible if (SHAPE.key() in h.warm) == warm_any]
        if policy == "spread":
            assert first.running == min(h.running for h in cold)
        else:
            assert first.running == max(h.running for h in cold)
