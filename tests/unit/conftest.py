"""Shared settings for the unit tests: no VM, no network, every test bounded in time."""

from __future__ import annotations

import pytest

#: Per-test ceiling (pytest-timeout). Unit tests take milliseconds; this only stops hangs.
UNIT_TIMEOUT = 60
#: Property tests run hundreds of examples: on a starved shared host (2 cores, many
#: processes) they can need minutes of wall time without hanging.
PROPERTY_TIMEOUT = 300


def is_property_test(item: pytest.Item) -> bool:
    """A hypothesis ``@given`` test (hypothesis marks its wrappers with this attribute)."""
    return bool(getattr(getattr(item, "obj", None), "is_hypothesis_test", False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every unit test a timeout unless it sets its own (a hang bound, not a speed
    check: durations are measured in bench/)."""
    for item in items:
        if "tests/unit" in str(item.path) and item.get_closest_marker("timeout") is None:
            limit = PROPERTY_TIMEOUT if is_property_test(item) else UNIT_TIMEOUT
            item.add_marker(pytest.mark.timeout(limit))
