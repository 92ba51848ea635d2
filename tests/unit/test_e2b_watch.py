"""The poll watcher's diff: what changed between two listings, as envd events (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mvm.e2b.watch import Listing, diff


def test_each_kind_of_change() -> None:
    old: Listing = {
        "a.txt": ("file", 1, 1.0, 0o644),
        "gone": ("file", 1, 1.0, 0o644),
        "d": ("dir", 0, 1.0, 0o755),
        "swap": ("file", 1, 1.0, 0o644),
        "same": ("file", 1, 1.0, 0o644),
    }
    new: Listing = {
        "a.txt": ("file", 2, 2.0, 0o600),
        "d": ("dir", 0, 5.0, 0o755),  # a directory's mtime moves with its entries: no WRITE
        "d/new": ("file", 0, 3.0, 0o644),
        "swap": ("dir", 0, 1.0, 0o755),
        "same": ("file", 1, 1.0, 0o644),
    }
    assert diff(old, new) == [
        {"name": "d/new", "type": "EVENT_TYPE_CREATE"},
        {"name": "a.txt", "type": "EVENT_TYPE_WRITE"},
        {"name": "a.txt", "type": "EVENT_TYPE_CHMOD"},
        {"name": "swap", "type": "EVENT_TYPE_REMOVE"},
        {"name": "swap", "type": "EVENT_TYPE_CREATE"},
        {"name": "gone", "type": "EVENT_TYPE_REMOVE"},
    ]


entries = st.dictionaries(
    st.text("abc/", min_size=1, max_size=4),
    st.tuples(
        st.sampled_from(["file", "dir"]), st.integers(0, 3), st.floats(0, 3), st.integers(0, 7)
    ),
    max_size=8,
)


@given(entries, entries)
def test_no_change_no_events_and_names_come_from_the_listings(old: Listing, new: Listing) -> None:
    assert diff(old, old) == []
    events = diff(old, new)
    assert {e["name"] for e in events} <= old.keys() | new.keys()
    created = {e["name"] for e in events if e["type"] == "EVENT_TYPE_CREATE"}
    assert new.keys() - old.keys() <= created
