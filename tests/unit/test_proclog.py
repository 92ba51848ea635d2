"""The process-output marks mvmd keeps across restarts (service.proclog.ProcLog): pure."""

from __future__ import annotations

from pathlib import Path

from mvm.service import proclog
from mvm.service.proclog import ProcLog


def test_marks_survive_a_reload_and_only_grow(tmp_path: Path) -> None:
    path = tmp_path / "proclog.jsonl"
    a = ProcLog(path, fresh=True)
    a.start(1)
    a.advance(1, "stdout", 10)
    a.advance(1, "stdout", 4)  # never backwards
    a.advance(1, "stderr", 3)
    a.exit(1, "aid-1")
    a.exit(1, "aid-2")  # logged once
    b = ProcLog(path, fresh=False)
    assert b.started == {1}
    assert b.end(1, "stdout") == 10 and b.end(1, "stderr") == 3 and b.end(2, "stdout") == 0
    assert b.exited == {1: "aid-1"}
    assert ProcLog(path, fresh=True).ends == {}  # a new guest starts from nothing


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "proclog.jsonl"
    path.write_bytes(
        b'not json\n{"p": "x"}\n{"p": 2, "s": "stdout", "e": 7}\n{"p":3,"s":"bad","e":1}\n'
    )
    b = ProcLog(path, fresh=False)
    assert b.ends == {(2, "stdout"): 7}


def test_the_file_is_compacted_past_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "proclog.jsonl"
    a = ProcLog(path, fresh=True)
    a.start(5)
    for i in range(1, 5000):
        a.advance(5, "stdout", i)
    assert path.stat().st_size <= proclog.COMPACT_AT
    b = ProcLog(path, fresh=False)
    assert b.end(5, "stdout") == 4999 and b.started == {5}
