"""Shared settings for the unit tests: no VM, no network, every test bounded in time."""

from __future__ import annotations

import pytest

#: Per-test ceiling (pytest-timeout). Unit tests take milliseconds; this only stops hangs.
UNIT_TIMEOUT = 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every unit test a short timeout unless it sets its own."""
    for item in items:
        if "tests/unit" in str(item.path) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT))
