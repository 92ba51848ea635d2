"""Audit end to end with real VMs: receipts of one-shot runs, the chain mvmd writes for a
sandbox's life, no payload bytes in the log, and tampered copies named by ``audit verify``.

Runs under a private MVM_HOME (its own daemon, its own audit key) that shares the default
store's images, like test_daemon.py. One sandbox's life (the ``sandbox_life`` fixture)
serves the whole module, so each test finds the records it checks whatever ran before it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mvmd_home import (
    Ctl,
    private_home,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

#: Unique per run: must appear in no audit file although it went through file, env and output.
MARKER = f"mvm-audit-marker-{secrets.token_hex(8)}"
SECRET_ENV = f"envval-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvma-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    return Ctl(home)


def log_path(home: Path) -> Path:
    return home / "audit" / "default.jsonl"


def records(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path(home).read_bytes().splitlines()]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_run_receipt_verifies_and_an_edit_breaks_it(ctl: Ctl, home: Path) -> None:
    receipt = home / "receipt.json"
    out = json.loads(
        ctl.ok(
            "run",
            "--json",
            "--receipt",
            str(receipt),
            "-e",
            f"TOKEN={SECRET_ENV}",
            "--",
            "python3",
            "-c",
            f"print({MARKER!r})",
        ).out
    )
    assert out["exit_code"] == 0 and out["stdout"] == MARKER + "\n"
    rec = json.loads(ctl.ok("audit", "show", out["audit_id"], "--json").out)
    assert rec["event"] == "cmd.exec.finished" and rec["actor"] == "mvmctl"
    assert rec["data"]["stdout_sha256"] == sha(MARKER.encode() + b"\n")
    assert rec["data"]["stdout_bytes"] == len(MARKER) + 1

    body = json.loads(receipt.read_text())
    assert body["audit_id"] == out["audit_id"] and body["exit_code"] == 0
    assert body["env_keys"] == ["TOKEN"]
    assert body["outputs"]["stdout"]["sha256"] == sha(MARKER.encode() + b"\n")
    r = ctl("receipt", "verify", str(receipt))
    assert r.rc == 0 and "ok" in r.out, str(r)

    body["exit_code"] = 1
    receipt.write_text(json.dumps(body))
    r = ctl("receipt", "verify", str(receipt))
    assert r.rc == 1 and "bad signature" in r.err, str(r)


@pytest.fixture(scope="module")
def sandbox_life(ctl: Ctl) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Sandbox ``aud``: up, a file written, an exec, mkdir, mv, down (8 audit records)."""
    info = ctl.json(
        "up", "--image", "python", "--name", "aud", "--ttl", "10m", "-e", f"TOKEN={SECRET_ENV}"
    )
    content = f"{MARKER}\n".encode() * 3
    ctl.ok("fs", "write", "aud", "/work/m.txt", input=content)
    ex = json.loads(ctl.ok("exec", "aud", "--json", "--", "cat", "/work/m.txt").out)
    ctl.ok("fs", "mkdir", "aud", "/work/d")
    ctl.ok("fs", "mv", "aud", "/work/m.txt", "/work/d/m.txt")
    assert ctl.ok("fs", "read", "aud", "/work/d/m.txt").out.encode() == content
    ctl.ok("down", "aud")
    return info, ex, content


def test_sandbox_life_is_a_chain_of_events_without_payloads(
    home: Path, sandbox_life: tuple[dict[str, Any], dict[str, Any], bytes]
) -> None:
    info, ex, content = sandbox_life
    assert ex["stdout"].encode() == content
    mine = [r for r in records(home) if r["sandbox"] == "aud"]
    events = [r["event"] for r in mine]
    assert events == [
        "plan.admitted",  # admission (policy) runs before every launch
        "sandbox.launched",
        "fs.write",
        "cmd.exec.started",
        "cmd.exec.finished",
        "fs.mkdir",
        "fs.move",
        "fs.read",
        "sandbox.stopped",
    ], events
    by = {r["event"]: r for r in mine}
    assert info["audit_id"] == by["sandbox.launched"]["id"]
    assert by["sandbox.launched"]["data"]["env_keys"].count("TOKEN") == 1
    assert by["sandbox.launched"]["data"]["image_id"]
    w = by["fs.write"]["data"]
    assert (w["path"], w["size"], w["sha256"]) == ("/work/m.txt", len(content), sha(content))
    r = by["fs.read"]["data"]  # what came out of the guest, by hash and size
    assert (r["path"], r["size"], r["sha256"]) == ("/work/d/m.txt", len(content), sha(content))
    fin = by["cmd.exec.finished"]
    assert ex["audit_id"] == fin["id"]
    assert fin["data"]["exit_code"] == 0
    assert (fin["data"]["stdout_sha256"], fin["data"]["stdout_bytes"]) == (
        sha(content),
        len(content),
    )
    assert by["cmd.exec.started"]["data"]["argv_sha256"] == sha(
        json.dumps(["cat", "/work/m.txt"], separators=(",", ":")).encode()
    )
    assert by["sandbox.stopped"]["data"]["reason"] == "down"
    seqs = [r["seq"] for r in mine]
    assert seqs == sorted(seqs)

    # Not in the log, not in the key files, nowhere under audit/: no payload, no env value.
    for f in (home / "audit").iterdir():
        data = f.read_bytes()
        assert MARKER.encode() not in data, f
        assert SECRET_ENV.encode() not in data, f


def test_verify_passes_then_names_edited_removed_and_swapped_records(
    ctl: Ctl, home: Path, sandbox_life: object
) -> None:
    r = ctl("audit", "verify")
    assert r.rc == 0 and r.out.startswith("ok:"), str(r)
    lines = log_path(home).read_bytes().splitlines(keepends=True)
    assert len(lines) >= 8
    copy = home / "copy.jsonl"
    pub = str(home / "audit" / "host.pub")

    def first_bad(new_lines: list[bytes]) -> dict[str, Any]:
        copy.write_bytes(b"".join(new_lines))
        res = ctl("audit", "verify", "--file", str(copy), "--pubkey", pub, "--json")
        assert res.rc == 1, str(res)
        rep = json.loads(res.out)
        assert not rep["ok"]
        return rep["first_bad"]  # type: ignore[no-any-return]

    edited = list(lines)
    rec = json.loads(edited[3])
    rec["actor"] = "someone-else"
    edited[3] = json.dumps(rec, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    bad = first_bad(edited)
    assert (bad["line"], bad["seq"], bad["reason"]) == (4, 4, "bad signature")

    removed = lines[:4] + lines[5:]
    bad = first_bad(removed)
    assert (bad["line"], bad["seq"], bad["reason"]) == (5, 6, "sequence gap")

    swapped = list(lines)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    bad = first_bad(swapped)
    assert (bad["line"], bad["seq"], bad["reason"]) == (6, 7, "reordered")

    r = ctl("audit", "verify", "--file", str(copy), "--pubkey", pub)
    assert r.rc == 1 and "line 6" in r.err and "seq 7" in r.err, str(r)
    assert ctl("audit", "verify").rc == 0  # the real log was never touched
