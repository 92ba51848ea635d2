"""``mvmctl compile`` / ``run --mode``: which scripts run under Node, and the clear errors
when Node or the built TypeScript SDK is missing (the runs themselves are in sdk-ts/test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvm.cli import script
from mvm.errors import HostError


@pytest.mark.parametrize(
    ("name", "node"),
    [
        ("a.ts", True),
        ("a.mts", True),
        ("a.js", True),
        ("a.mjs", True),
        ("A.TS", True),
        ("a.py", False),
        ("a", False),
        ("a.tsx.py", False),
    ],
)
def test_node_scripts_are_told_by_suffix(name: str, node: bool) -> None:
    assert script.is_node_script(Path(name)) is node


def test_unbuilt_sdk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_NODE", "/usr/bin/node")
    monkeypatch.setenv("MVM_SDK_TS", str(tmp_path))
    with pytest.raises(HostError, match="not built") as ei:
        script.node_command(Path("x.ts"))
    assert ei.value.hint and "npm ci" in ei.value.hint


def test_runner_of_a_built_sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = tmp_path / "dist" / "src" / "runner.js"
    runner.parent.mkdir(parents=True)
    runner.write_text("")
    monkeypatch.setenv("MVM_NODE", "/opt/node/bin/node")
    monkeypatch.setenv("MVM_SDK_TS", str(tmp_path))
    assert script.node_command(Path("x.ts")) == ["/opt/node/bin/node", str(runner), "x.ts"]


def test_missing_node_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVM_NODE", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(HostError, match=r"Node\.js is not installed"):
        script.node_command(Path("x.ts"))
