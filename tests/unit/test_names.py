"""The one name rule (src/mvm/names.py): what it accepts and what it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm import names
from mvm.errors import InvalidArgument


@pytest.mark.parametrize(
    "bad",
    ["", "..", ".", "a/b", "x/../victim", "p2?x=1", "a#b", "a%2fb", "a\x01b", "A", "-a", "a" * 64],
)
def test_sandbox_names_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        names.check("sandbox", bad)
    assert e.value.hint is not None and "lower-case" in e.value.hint


@pytest.mark.parametrize("good", ["a", "web-1", "a.b_c", "0", "a" * 63])
def test_sandbox_names_accepted(good: str) -> None:
    assert names.check("sandbox", good) == good


def test_forward_ids() -> None:
    assert names.check("forward", "fw-0123abcd") == "fw-0123abcd"
    with pytest.raises(InvalidArgument):
        names.check("forward", "fw-../x")


def test_non_strings_refused() -> None:
    for v in (None, 3, b"abc", ["a"]):
        assert not names.is_valid("secret", v)


@given(st.text(max_size=80))
def test_no_valid_name_can_change_a_url_path(s: str) -> None:
    for kind in ("sandbox", "snapshot", "image", "secret", "tenant", "token", "forward"):
        if names.is_valid(kind, s):  # type: ignore[arg-type]
            assert "/" not in s and "?" not in s and "#" not in s and "%" not in s
            assert s not in (".", "..") and s.isprintable() and s.strip() == s
