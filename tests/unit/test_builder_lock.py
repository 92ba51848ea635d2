"""``--locked``: a build that would change ``mvm.lock`` is refused, naming what differs."""

from __future__ import annotations

import pytest

from mvm.builder import inguest
from mvm.builder import lock as L
from mvm.errors import ManifestError

LOCK = L.Lock(
    L.VERSION,
    "app",
    {"dockerfile": "d1", "context": "c1"},
    ["base-files=12.4", "libc6:amd64=2.36-9", "python3-minimal=3.11.2-1"],
    "f" * 64,
    "i" * 64,
)


def test_matching_inputs_pass() -> None:
    L.check_inputs(LOCK, {"dockerfile": "d1", "context": "c1"}, ["python3-minimal", "libc6"])
    L.check_result(LOCK, list(reversed(LOCK.packages)), "f" * 64)


@pytest.mark.parametrize(
    ("inputs", "wanted", "what"),
    [
        ({"dockerfile": "d2", "context": "c1"}, [], r"inputs differ.*\(dockerfile\)"),
        ({"dockerfile": "d1"}, [], r"inputs differ.*\(context\)"),
        ({"dockerfile": "d1", "context": "c1", "archive": "a"}, [], r"\(archive\)"),
        ({"dockerfile": "d1", "context": "c1"}, ["curl"], "packages not in the lock: curl"),
    ],
)
def test_changed_inputs_are_refused(inputs: dict[str, str], wanted: list[str], what: str) -> None:
    with pytest.raises(ManifestError, match=what) as info:
        L.check_inputs(LOCK, inputs, wanted)
    assert "would change mvm.lock" in info.value.message
    assert "without --locked" in (info.value.hint or "")


def test_a_different_result_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"packages differ \(base-files=12.4, base-files=12.5"):
        L.check_result(LOCK, ["base-files=12.5", *LOCK.packages[1:]], "f" * 64)
    with pytest.raises(ManifestError, match="root filesystem came out as eeeeeeeeeeee"):
        L.check_result(LOCK, LOCK.packages, "e" * 64)


def test_the_builder_names_a_pin_the_mirror_lacks() -> None:
    inguest.check_pins(["a=1", "gone=2"], ["a=1"])  # not installed at all: not its business
    with pytest.raises(Exception, match=r"no longer serves b=2 \(got 3\)"):
        inguest.check_pins(["a=1", "b=2"], ["a=1", "b=3"])
