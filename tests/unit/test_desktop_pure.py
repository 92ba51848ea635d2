"""Pure parts of the desktop SDK and CLI: resolutions, the RandR command, key and text checks."""

from __future__ import annotations

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.cli.desktop import parse_resolution
from mvm.errors import InvalidArgument
from mvm.sdk import desktop

LO, HI = desktop.MIN_RESOLUTION, desktop.MAX_RESOLUTION


@given(st.integers(LO[0], HI[0]), st.integers(LO[1], HI[1]))
def test_sizes_in_range_are_accepted_and_make_one_plain_command(w: int, h: int) -> None:
    assert desktop.check_resolution((w, h)) == (w, h)
    argv = desktop.resolution_script(w, h)
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3
    # only digits, the mode name and fixed words reach the shell
    assert set(argv[2]) <= set("abcdefghijklmnopqrstuvwxyz0123456789-./>&; ")
    assert f"--mode mvm-{w}x{h}" in argv[2]


@pytest.mark.parametrize(
    "bad",
    [
        (HI[0] + 1, 768),
        (1024, HI[1] + 1),
        (LO[0] - 1, 768),
        (0, 0),
        (-1024, 768),
        (1024,),
        (1024, 768, 24),
        "1024x768",
        (1024.0, 768),
        (True, 768),
        None,
    ],
)
def test_sizes_out_of_range_or_of_the_wrong_type_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        desktop.check_resolution(bad)


def test_the_default_is_offered() -> None:
    assert desktop.check_resolution(desktop.DEFAULT_RESOLUTION) == (1024, 768)


@pytest.mark.parametrize("text,want", [("1280x800", (1280, 800)), ("800X600", (800, 600))])
def test_cli_parses_resolutions(text: str, want: tuple[int, int]) -> None:
    assert parse_resolution(text) == want


@pytest.mark.parametrize("text", ["", "1280", "1280x", "x800", "12.5x8", "1280x800x24", "1e3x8"])
def test_cli_refuses_malformed_resolutions(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_resolution(text)


@given(st.text(max_size=64))
def test_key_names_reaching_xdotool_are_keysym_like(keys: str) -> None:
    try:
        out = desktop.check_keys(keys)
    except InvalidArgument:
        return
    assert out == [keys] and all(c.isalnum() or c in "_+" for c in keys)
