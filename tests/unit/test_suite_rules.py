"""The suite's own rules (tests/conftest.py): under CI=true a skip fails the run with its
reason; outside CI it stays a skip; the allow-list lets a named test skip; the Python and
TypeScript tests run in one seeded random order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
REPO = ROOT_CONFTEST.parents[1]

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


def test_ci_loads_the_hypothesis_ci_profile(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CI=true: no wall-clock deadline, a fixed example count, failing example
    printed (a subprocess: loading a profile is global to the process)."""
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makepyfile(
        test_profile="from hypothesis import settings\n"
        "def test_profile():\n"
        "    s = settings()\n"
        "    assert (s.deadline, s.max_examples, s.print_blob) == (None, 100, True)\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_run_tests_sh_runs_ci_mode_in_a_seeded_random_order() -> None:
    """The suite's command sets CI=true, turns on pytest-randomly with a seed it prints
    and can replay (MVM_TEST_SEED)."""
    text = (REPO / "run-tests.sh").read_text()
    assert 'seed="${MVM_TEST_SEED:-' in text
    assert 'echo "==> pytest (random order, seed $seed' in text
    [line] = [ln for ln in text.splitlines() if "bin/pytest tests" in ln]
    assert line.startswith("CI=true ") and "-p randomly" in line, line
    assert '--randomly-seed="$seed"' in text


def test_the_typescript_tests_run_in_the_same_seeded_random_order() -> None:
    """run-tests.sh hands its seed to sdk-ts/run-tests.sh, which prints it, exports it to
    the test files and shuffles the files with it; every test file registers its tests
    through helpers.ts's seeded `test`, never node:test's own (Node 20 cannot shuffle)."""
    [line] = [
        ln for ln in (REPO / "run-tests.sh").read_text().splitlines() if "sdk-ts/run-tests.sh" in ln
    ]
    assert 'MVM_TEST_SEED="$seed" sdk-ts/run-tests.sh' in line, line
    ts = (REPO / "sdk-ts" / "run-tests.sh").read_text()
    assert 'seed="${MVM_TEST_SEED:-' in ts
    assert 'MVM_TEST_SEED="$seed"' in ts and "export MVM_HOME=" in ts
    assert 'node dist/test/order.js "$seed" "${files[@]}"' in ts
    assert 'echo "==> node --test (random order, seed $seed' in ts
    test_files = sorted((REPO / "sdk-ts" / "test").glob("*.test.ts"))
    assert test_files
    for f in test_files:
        text = f.read_text()
        imports_test = re.search(r'import \{[^}]*\btest\b[^}]*\} from "\./helpers\.js"', text)
        from_node = re.search(r'import \{[^}]*\btest\b[^}]*\} from "node:test"', text)
        assert imports_test and not from_node, f"{f.name}: import test from ./helpers.js"


#: Patterns no test may contain (the suite's rules, DEVELOPERS.md): the regression check
#: for a duration asserted, an error left unnamed or an assertion with two answers.
FORBIDDEN = {
    r"assert\b.*\b(elapsed|waited|took)\b\s*[<>]": "a duration asserted (bench/ times things)",
    r"assert\b.*\b(monotonic|perf_counter)\(\)\s*-": "a duration asserted (bench/ times things)",
    r"assert\b.*\bDate\.now\(\)\s*-": "a duration asserted (bench/ times things)",
    r"pytest\.raises\((Base)?Exception\)": "pytest.raises(Exception): name the one error",
    r"[aA]udit_?[iI]d (is None|=== null) (or|\|\|)": "two answers for an audit id",
    r"signal (==|===) 9 (or|\|\|)": "two answers for a kill",
}


def suite_files() -> list[Path]:
    files = [*(REPO / "tests").rglob("*.py"), *(REPO / "sdk-ts" / "test").rglob("*.ts")]
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def test_no_test_asserts_a_duration_or_two_answers() -> None:
    found = []
    for f in suite_files():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, line):
                    found.append(f"{f.relative_to(REPO)}:{n}: {why}: {line.strip()}")
    assert found == []


def test_the_forbidden_patterns_catch_what_they_name() -> None:
    bad = [
        "    assert elapsed < n * 1.0",
        "    assert waited < 5",
        "    assert time.monotonic() - start < 50",
        "  assert.ok(Date.now() - t0 < 1000);",
        "    with pytest.raises(Exception):",
        "    assert r.audit_id is None or isinstance(r.audit_id, str)",
        "  assert.ok(r.auditId === null || typeof r.auditId === 'string');",
        "    assert r.signal == 9 or r.exit_code in (137, -9)",
    ]
    for line in bad:
        assert any(re.search(p, line) for p in FORBIDDEN), line
    assert suite_files(), "no test files found"
