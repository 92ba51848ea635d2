"""Pure parts of the E2B control plane: create mapping and paging."""

from __future__ import annotations

import pytest

from mvm import errors, tenancy
from mvm.e2b.control import create_request, page
from mvm.tokens import Identity

ACME = Identity(token_id="t1", tenant="acme", scopes=("e2b",))


def test_paging_walks_every_item_once() -> None:
    items = list(range(7))
    seen, token = [], None
    while True:
        got, token = page(items, 3, token)
        seen += got
        if token is None:
            break
    assert seen == items
    assert page(items, None, None) == (items, None)
    with pytest.raises(errors.InvalidArgument):
        page(items, "x", None)
    with pytest.raises(errors.InvalidArgument):
        page(items, 1, "-1")


def test_create_maps_template_timeout_env_metadata_and_network() -> None:
    req = create_request(
        ACME,
        {"templateID": "base", "timeout": 60, "envVars": {"A": "1"}, "metadata": {"k": "v"}},
    )
    assert req.image == "python" and req.ttl_seconds == 60 and req.env == {"A": "1"}
    assert req.tags == {"e2b.k": "v", "e2b.template": "base"}
    assert req.network.preset == "none" and req.name and tenancy.owns("acme", req.name)
    net = create_request(ACME, {"templateID": "python-3.11", "allowInternetAccess": True})
    assert net.network.preset == "unrestricted" and net.ttl_seconds == 300
    hosts = create_request(ACME, {"templateID": "x", "network": {"allowOut": ["pypi.org"]}})
    assert (hosts.network.preset, hosts.network.allow) == ("none", ["pypi.org"])
    for bad in (
        {},
        {"templateID": "x", "timeout": -1},
        {"templateID": "x", "volumeMounts": [1]},
        {"templateID": "x", "network": {"denyOut": ["0.0.0.0/0"]}},
        {"templateID": "x", "network": {"allowOut": [1]}},
    ):
        with pytest.raises(errors.InvalidArgument):
            create_request(ACME, bad)


def test_running_output_goes_out_in_whole_lines() -> None:
    from mvm.e2b.envd import MAX_PENDING, _ready

    assert _ready(b"a\nb\npartial", running=True) == b"a\nb\n"
    assert _ready(b"partial", running=True) == b""
    assert _ready(b"partial", running=False) == b"partial"
    long = b"x" * MAX_PENDING
    assert _ready(long, running=True) == long
