"""Rules for the whole suite: no silent skips in CI, one hypothesis profile for CI.

A skipped VM, security or egress test is a feature nobody checked. Under ``CI=true`` (set
by CI and by run-tests.sh) a skip of any test fails the run with its reason, unless its
node id matches an entry of ``SKIP_ALLOWED`` (each entry says why it cannot run on the
machines the suite is run on). Outside CI a skip stays a skip, so a laptop without QEMU
can still run the unit tests.

The order of the tests is random (pytest-randomly, seed printed in the header); every test
must pass alone (``-k``) and in any order.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]

#: Skips that stay skips even under CI=true: node id prefix → why it truly cannot run.
#: Keep it empty unless a test cannot run on the CI host (root, Debian 12, QEMU, iproute2
#: are all installed by install.sh there); README.md's Tests section lists them too.
SKIP_ALLOWED: dict[str, str] = {}

#: Hypothesis under CI: no wall-clock deadline (a shared TCG host is slow and the deadline
#: is a timing threshold), a fixed number of examples, and the failing example printed.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None)


def strict() -> bool:
    """True when skips must fail: CI, or the suite's own test command."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


settings.load_profile("ci" if strict() else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def skip_allowed(nodeid: str) -> bool:
    return any(nodeid.startswith(prefix) for prefix in SKIP_ALLOWED)


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Under CI, turn a skipped test into a failure that carries the skip's reason."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (strict() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if skip_allowed(item.nodeid):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true (not in tests/conftest.py SKIP_ALLOWED): {_reason(report.longrepr)}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, None]:
    """Under CI, a module skipped at import (``pytest.skip(allow_module_level=True)``,
    ``importorskip``) is a collection error, not a quiet skip."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if strict() and report.skipped and not skip_allowed(report.nodeid):
        report.outcome = "failed"
        report.longrepr = (
            f"module skipped under CI=true (not in SKIP_ALLOWED): {_reason(report.longrepr)}"
        )
