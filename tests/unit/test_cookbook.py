"""The cookbook copy the tests run (tests/cookbook.py) cannot drift from the reference page.

The page (shared/reference/sdk-operations-cookbook.txt, beside the repository: CI clones
the repository next to ``shared/``) prints the SDK example with its indentation flattened.
``tests/cookbook_reference.txt`` is a verbatim copy of that code block, so the comparison
with tests/cookbook.py holds in any clone; when the page is there, the copy must equal it
(under CI=true its absence fails the run, see tests/conftest.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.cookbook import COOKBOOK

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "tests" / "cookbook_reference.txt"
PAGE = Path("reference") / "sdk-operations-cookbook.txt"
#: ``shared/`` beside the repository (CI, the main checkout) or beside the worktree folder.
SHARED_CANDIDATES = (REPO.parent / "shared", REPO.parent.parent / "shared")


def code_block(page: str) -> str:
    """The page's SDK example: from the line ``import mvm`` to the first blank line."""
    lines = page.splitlines()
    start = lines.index("import mvm")
    end = lines.index("", start)
    return "\n".join(lines[start:end]) + "\n"


def flat(code: str) -> list[str]:
    """Lines without their indentation (the page's rendering drops it)."""
    return [line.strip() for line in code.splitlines() if line.strip()]


def test_cookbook_copy_is_the_reference_block_with_its_indentation() -> None:
    printed = COOKBOOK.replace('"IMAGE"', '"python-3.12"')
    assert printed != COOKBOOK, "tests/cookbook.py lost its IMAGE placeholder"
    assert flat(printed) == flat(VENDORED.read_text())
    ast.parse(printed)  # the indentation the page lost is restored, validly


def test_vendored_block_is_the_reference_page_s() -> None:
    found = [d / PAGE for d in SHARED_CANDIDATES if (d / PAGE).is_file()]
    if not found:
        pytest.skip(f"reference page not found beside the repository ({REPO.parent / 'shared'})")
    assert VENDORED.read_text() == code_block(found[0].read_text())


def test_code_block_extraction() -> None:
    page = "table\nimport mvm\nwith x:\ny\n\nSecurity notes:\n"
    assert code_block(page) == "import mvm\nwith x:\ny\n"
