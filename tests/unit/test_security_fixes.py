"""Unit tests for fixes found by the security suite (tests/security): pure parts only."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from mvm.agent.client import NAME_MAX, bad_entry_name


def test_names_no_directory_can_hold_are_refused() -> None:
    for name in ("", ".", "..", "../../etc/passwd", "a/b", "/", "a\x00b", "x" * (NAME_MAX + 1)):
        assert bad_entry_name(name) is not None, name


def test_odd_but_legal_names_pass() -> None:
    for name in ("a", "...", ".hidden", "\x1b[2J", "sp ace", "é" * 127, "x" * NAME_MAX, "\udcff"):
        assert bad_entry_name(name) is None, name


@given(st.text(min_size=1, max_size=300))
def test_agrees_with_what_a_linux_directory_can_hold(name: str) -> None:
    raw = name.encode("utf-8", "surrogatepass")
    legal = name not in (".", "..") and "/" not in name and "\x00" not in name
    legal = legal and len(raw) <= NAME_MAX
    assert (bad_entry_name(name) is None) == legal
    if legal:  # joining it to a directory cannot climb out of that directory
        assert os.path.basename(name) == name
        assert os.path.normpath(os.path.join("/d", name)).startswith("/d/")
