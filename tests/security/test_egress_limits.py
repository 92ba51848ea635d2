"""A real sandbox's egress connection is cut at mvmd's byte cap, and the cut is audited.

The module's private mvmd runs with ``MVM_EGRESS_MAX_BYTES=100``; "the internet" is the
network-namespace HTTP server of test_network.py (its ``internet`` fixture, needs root).
A CONNECT tunnel through the proxy carries a GET whose answer is far over 100 bytes: the
guest gets at most what fits, never the page's token, and the audit log has one
``egress.limit`` record naming the byte limit. (The time and idle caps are driven with
short limits in tests/unit/test_egress_limits.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mvmd_home import Ctl, private_home
from tests.security.test_network import (  # noqa: F401  (the fixture is used by name)
    PORT,
    TOKEN,
    audit_records,
    connect_probe,
    internet,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

NAME = "net-capped"
CAP = 100


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmel-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path, internet: str) -> Ctl:  # noqa: F811
    c = Ctl(home)
    c.env["MVM_EGRESS_RESOLVE"] = f"allowed.test={internet}"
    c.env["MVM_EGRESS_MAX_BYTES"] = str(CAP)  # read by the mvmd this module starts
    c.ok("up", "--name", NAME, "--ttl", "30m", "--network-allow", f"allowed.test:{PORT}")
    return c


def test_a_connection_over_the_byte_cap_is_cut_and_audited(ctl: Ctl, home: Path) -> None:
    out = connect_probe(ctl, NAME, f"allowed.test:{PORT}")
    status, _, rest = out.partition("\n")
    assert status.startswith("HTTP/1.1 200"), out  # the tunnel was allowed ...
    assert TOKEN not in out and len(rest.encode()) <= CAP, out  # ... and cut at the cap
    recs = [r for r in audit_records(home, "egress.limit") if r["sandbox"] == NAME]
    assert len(recs) == 1, recs
    data = recs[0]["data"]
    assert (data["limit"], data["max"], data["bytes"]) == ("bytes", CAP, CAP), data
    assert (data["host"], data["port"]) == ("allowed.test", PORT), data
