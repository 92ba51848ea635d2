"""The suite's own rules (tests/conftest.py): under CI=true a skip fails the run with its
reason; outside CI it stays a skip; the allow-list lets a named test skip."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SKIPPING = """
import pytest

def test_needs_qemu():
    pytest.skip("qemu-system-x86_64 not found")

@pytest.mark.skipif(True, reason="no namespace here")
def test_marked():
    pass

def test_fine():
    assert True
"""


def _run(pytester: pytest.Pytester, conftest: str) -> pytest.RunResult:
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_probe=SKIPPING)
    return pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider", "-rA")


def test_skip_fails_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = _run(pytester, ROOT_CONFTEST.read_text())
    outcomes = result.parseoutcomes()
    # a skip in the call phase is a failure, one at setup (skipif) an error: both fail the run
    assert (outcomes.get("passed"), outcomes.get("failed"), outcomes.get("errors")) == (1, 1, 1)
    assert "skipped" not in outcomes
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "qemu-system-x86_64 not found" in out
    assert "no namespace here" in out


def test_module_skip_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makepyfile(
        test_mod="import pytest\npytest.skip('no tool', allow_module_level=True)\n"
        "def test_x():\n    pass\n"
    )
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider")
    assert result.ret != 0
    assert "no tool" in result.stdout.str()


def test_skip_stays_a_skip_outside_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = _run(pytester, ROOT_CONFTEST.read_text())
    result.assert_outcomes(passed=1, skipped=2)


def test_allow_list_lets_a_named_test_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    conftest = ROOT_CONFTEST.read_text().replace(
        "SKIP_ALLOWED: dict[str, str] = {}",
        'SKIP_ALLOWED: dict[str, str] = {"test_probe.py::test_marked": "cannot run here"}',
    )
    assert conftest != ROOT_CONFTEST.read_text()
    result = _run(pytester, conftest)
    result.assert_outcomes(passed=1, failed=1, skipped=1)
