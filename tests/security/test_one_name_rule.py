"""Issue 11.1: every kind of name (sandbox, snapshot, image, secret, forward id, token,
tenant) is checked by the one rule of ``mvm.names`` at every place that takes one — the
client building a URL, mvmd reading a route, the stores that turn a name into a file
path, the audit log routing a tenant's records — and they all agree.

No VM: the places are called directly (the through-mvmd cases are in
``test_names_and_args_through_mvmd.py``). Before this test the secret store, the audit
log's tenants and actors and the image manifests each had their own ``re.match(... $)``,
which lets a trailing newline through (``"KEY\\n"`` was a valid secret name).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm import client, names, secrets, tenancy
from mvm.audit import log as audit_log
from mvm.daemon import server
from mvm.errors import MvmError
from mvm.images import manifest
from mvm.tokens import TokenStore

HOSTILE = [
    "",
    ".",
    "..",
    "a/..",
    "../victim",
    "nothere/../victim",
    "zzz/../p2",
    "p2?x=1",
    "victim#frag",
    "%2e%2e",
    "a\x01b",
    "a\n",
    "a\r\n",
    "a\x00",
    " a",
    "a b",
    "a" * 65,
    "-a",
    "_a",
    "a\u202e",
    "\u0663",
]
VALID = ["victim", "p2", "a", "a.b_c-d", "0", "x" * 63]
NAME = st.one_of(st.sampled_from(HOSTILE + VALID), st.text(max_size=70))


def refuses(fn: Callable[[str], Any], name: str) -> bool:
    """Whether ``fn(name)`` raises an mvm error (anything else is a failure)."""
    try:
        fn(name)
    except MvmError:
        return True
    return False


def route_name(name: str) -> str:
    """mvmd's route helper, given a request whose path held ``name``."""
    return server.name(cast(Any, types.SimpleNamespace(match_info={"name": name})))


def acting_for(name: str) -> None:
    with audit_log.acting_for(name, "tok"):
        pass


def places(tmp: Path) -> dict[names.Kind, list[Callable[[str], Any]]]:
    tokens = TokenStore(tmp / "tokens")
    return {
        "sandbox": [
            lambda n: client.seg("sandbox", n),
            route_name,
            lambda n: tenancy.to_service(tenancy.LOCAL, n),
        ],
        "snapshot": [
            lambda n: client.seg("snapshot", n),
            lambda n: tenancy.to_service(tenancy.LOCAL, n, "snapshot"),
        ],
        "image": [
            lambda n: manifest.validate(manifest.Manifest(name=n), "test"),
        ],
        "forward": [lambda n: client.seg("forward", n)],
        "secret": [secrets.check_name],
        "token": [tokens._path],
        "tenant": [tenancy.prefix, acting_for],
    }


@pytest.mark.parametrize("kind", sorted(names._RULES))
@settings(max_examples=300, deadline=None)
@given(name=NAME)
def test_every_place_that_takes_a_name_applies_the_one_rule(
    tmp_path_factory: pytest.TempPathFactory, kind: names.Kind, name: str
) -> None:
    valid = names.is_valid(kind, name)
    for place in places(tmp_path_factory.getbasetemp())[kind]:
        assert refuses(place, name) is not valid, (kind, name, place)


@pytest.mark.parametrize("name", HOSTILE)
def test_the_reported_names_are_refused_by_every_kind(name: str) -> None:
    for kind in names._RULES:
        assert not names.is_valid(kind, name), (kind, name)


@settings(max_examples=500, deadline=None)
@given(name=st.text(max_size=70))
def test_a_valid_name_cannot_change_a_url_or_a_path(name: str) -> None:
    """What the rule lets through is one plain path segment: quoting leaves it as it is."""
    for kind in names._RULES:
        if names.is_valid(kind, name):
            assert name not in (".", "..")
            assert not set(name) & set("/?#%\\ \x00\n\r\t")
            assert name.isascii() and name.isprintable()
            if kind in ("sandbox", "snapshot", "forward"):
                assert client.seg(kind, name) == name


def test_the_token_store_never_reads_a_file_for_an_invalid_id(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    for bad in HOSTILE:
        assert store.verify(f"mvm_{bad}_secret") is None


def test_the_actor_label_refuses_a_newline() -> None:
    """The actor travels in a header (``X-Mvm-Actor``): a trailing newline was accepted."""
    for check in (client.check_actor, lambda a: audit_log.labelled(a).__enter__()):
        for bad in ("me\n", "me\r\n", "me\x00", ""):
            assert refuses(check, bad), repr(bad)
