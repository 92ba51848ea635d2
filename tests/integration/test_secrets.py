"""Secrets and admission end to end: a real mvmd, a real VM, `mvmctl` subprocesses.

One private MVM_HOME and one sandbox for the module (see test_daemon.py for the pattern).
The secret value is random per run; every file of the home (SQLite state and WAL, event
logs, audit log, mvmd.log) and every CLI output captured by the module's ``ctl`` is
searched for it, by a test (at whatever point of the run it comes) and again in the
``ctl`` fixture's teardown, after every test of the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mvmd_home import (
    Ctl,
    Res,
    private_home,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

#: Random per run; the hex tail keeps it distinct from anything else in the home.
VALUE = "sk-test-" + secrets.token_hex(12)
SHA = hashlib.sha256(VALUE.encode()).hexdigest()
MARK = "[REDACTED:api-key]"


class RecordingCtl(Ctl):
    """A Ctl that keeps every output of every call (searched for the value)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.captured: list[Res] = []

    def __call__(self, *args: str, **kw: object) -> Res:  # type: ignore[override]
        r = super().__call__(*args, **kw)  # type: ignore[arg-type]
        self.captured.append(r)
        return r


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmsec-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Iterator[RecordingCtl]:
    c = RecordingCtl(home)
    c.env["MVM_SECRETS_KEYRING"] = "0"
    c.env.pop("MVM_POLICY", None)
    yield c
    assert_value_nowhere(c, home)  # after every test of the module, whatever their order


@pytest.fixture(scope="module")
def stored(ctl: Ctl, home: Path) -> str:
    """The secret ``api-key`` stored, and the policy file written."""
    r = ctl.ok("secret", "put", "api-key", input=VALUE + "\n")
    assert "api-key" in r.err
    (home / "policy.toml").write_text("max_cpus = 2\nmax_ttl_seconds = 3600\n")
    return "api-key"


@pytest.fixture(scope="module")
def sandbox(ctl: Ctl, stored: str) -> str:
    """One sandbox up with a create-level secret env."""
    ctl.ok("up", "--name", "sec", "--ttl", "20m", "-e", "FROM_UP=secret:api-key", "-e", "PLAIN=1")
    return "sec"


def test_secret_ls_shows_names_only(ctl: Ctl, sandbox: str) -> None:
    assert ctl.json("secret", "ls") == ["api-key"]
    assert ctl.ok("secret", "ls").out.split() == ["api-key"]


def test_exec_injects_and_redacts(ctl: Ctl, sandbox: str) -> None:
    script = (
        'echo "$API_KEY"; echo "err:$API_KEY" >&2; printf %s "$API_KEY" | rev; echo; '
        'printf %s "$API_KEY" | sha256sum; printf %s "$FROM_UP" | sha256sum'
    )
    r = ctl.ok("exec", sandbox, "-e", "API_KEY=secret:api-key", "--", "sh", "-c", script)
    lines = r.out.splitlines()
    assert lines[0] == MARK
    assert r.err.strip() == f"err:{MARK}"
    # The value really is in the process environment, whole: its hash matches, as does the
    # reversed form (which redaction does not, and cannot, recognise).
    assert lines[1] == VALUE[::-1]
    assert lines[2].split()[0] == SHA
    assert lines[3].split()[0] == SHA  # the create-level secret env reaches every exec


#: Writes the first half of $API_KEY, waits (bounded) until the agent has read it out of
#: the stdout pipe (FIONREAD on a pipe, either end, counts the unread bytes: 0), then
#: writes the rest: the agent reads, and sends, the value as two chunks every time.
SPLIT_WRITER = r"""
import fcntl, os, struct, sys, termios, time
v = os.environ["API_KEY"].encode()
os.write(1, v[: len(v) // 2])
for _ in range(4000):
    if struct.unpack("i", fcntl.ioctl(1, termios.FIONREAD, b"\0" * 4))[0] == 0:
        break
    time.sleep(0.005)
else:
    sys.exit(3)
os.write(1, v[len(v) // 2 :] + b"\n")
"""


def test_value_split_across_writes_is_redacted(ctl: Ctl, sandbox: str) -> None:
    r = ctl.ok("exec", sandbox, "-e", "API_KEY=secret:api-key", "--", "python3", "-c", SPLIT_WRITER)
    assert r.out == MARK + "\n"


def test_json_output_is_redacted(ctl: Ctl, sandbox: str) -> None:
    r = ctl.ok("exec", sandbox, "-e", "K=secret:api-key", "--json", "--", "sh", "-c", 'echo "$K"')
    obj = json.loads(r.out)
    assert obj["stdout"] == MARK + "\n"
    assert VALUE not in r.out


def test_proc_output_and_logs_are_redacted(ctl: Ctl, sandbox: str) -> None:
    r = ctl.ok(
        "proc", "start", sandbox, "-e", "K=secret:api-key", "--json", "--",
        "sh", "-c", 'echo "proc:$K"; echo "proc-err:$K" >&2',
    )  # fmt: skip
    proc = str(json.loads(r.out)["proc"])
    ctl.ok("proc", "wait", sandbox, proc, "--timeout", "60s")
    assert ctl.ok("proc", "output", sandbox, proc).out == f"proc:{MARK}\n"
    assert ctl.ok("proc", "output", sandbox, proc, "--stderr").out == f"proc-err:{MARK}\n"
    logs = ctl.ok("logs", sandbox).out
    assert f"proc:{MARK}" in logs and f"proc-err:{MARK}" in logs


def test_unknown_secret_fails_before_the_command_starts(ctl: Ctl, sandbox: str) -> None:
    r = ctl("exec", sandbox, "-e", "X=secret:nope", "--", "touch", "/tmp/ran")
    assert r.rc == 125, str(r)  # SecretNotFound: an mvm error
    assert "no secret named 'nope'" in r.err and "api-key" in r.err
    assert ctl("exec", sandbox, "--", "test", "-e", "/tmp/ran").rc == 1


def test_errors_that_quote_the_value_are_redacted(ctl: Ctl, sandbox: str) -> None:
    """A command named after the value: whatever error comes back must not carry it."""
    r = ctl("exec", sandbox, "-e", "K=secret:api-key", "--", f"/nonexistent/{VALUE}")
    assert r.rc == 127  # the guest could not find the command
    leaked = VALUE in r.out + r.err
    assert not leaked, "the secret value came back in an error"


def test_policy_denial_names_its_rules(ctl: Ctl, sandbox: str, home: Path) -> None:
    r = ctl("up", "--name", "too-big", "--cpus", "3", "--ttl", "2h")
    assert r.rc == 125, str(r)  # PolicyDenied
    assert "[cpus]" in r.err and "max_cpus=2" in r.err and "[ttl]" in r.err
    assert "too-big" not in ctl.sandboxes()
    audit_text = "".join(p.read_text() for p in (home / "audit").rglob("*") if p.is_file())
    assert "plan.denied" in audit_text and "plan.admitted" in audit_text


def test_bad_policy_file_is_a_clear_error(ctl: Ctl, sandbox: str, home: Path) -> None:
    policy = home / "policy.toml"
    good = policy.read_text()
    policy.write_text("max_cpuz = 2\n")
    try:
        r = ctl("up", "--name", "bad-policy")
        assert r.rc == 2 and "unknown policy key" in r.err and "max_cpuz" in r.err
    finally:
        policy.write_text(good)


def test_one_shot_run_redacts_the_secret_everywhere(ctl: Ctl, stored: str, home: Path) -> None:
    """``mvmctl run -e K=secret:NAME``: the value reaches the command (its hash), and
    stdout, stderr, ``--json``, the receipt and the audit log carry the mark, never it."""
    script = 'echo "out:$K"; echo "err:$K" >&2; printf %s "$K" | sha256sum'
    r = ctl("run", "-e", f"K=secret:{stored}", "--", "sh", "-c", script, timeout=300)
    assert r.rc == 0, str(r)
    assert r.out.splitlines()[0] == f"out:{MARK}"
    assert r.out.splitlines()[1].split()[0] == SHA
    assert f"err:{MARK}" in r.err.splitlines()
    assert VALUE not in r.out + r.err

    receipt = home / "run-receipt.json"
    r = ctl(
        "run", "--json", "--receipt", str(receipt), "-e", f"K=secret:{stored}",
        "--", "sh", "-c", script, timeout=300,
    )  # fmt: skip
    assert r.rc == 0, str(r)
    assert VALUE not in r.out + r.err
    out = json.loads(r.out)
    stdout = f"out:{MARK}\n{SHA}  -\n"
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (0, stdout, f"err:{MARK}\n")

    text = receipt.read_text()
    assert VALUE not in text
    body = json.loads(text)
    assert body["audit_id"] == out["audit_id"]
    assert body["env_keys"].count("K") == 1
    assert body["outputs"]["stdout"]["sha256"] == hashlib.sha256(stdout.encode()).hexdigest()
    assert ctl("receipt", "verify", str(receipt)).rc == 0

    rec = json.loads(ctl.ok("audit", "show", out["audit_id"], "--json").out)
    assert rec["event"] == "cmd.exec.finished"
    assert rec["data"]["stdout_sha256"] == hashlib.sha256(stdout.encode()).hexdigest()
    for f in (home / "audit").iterdir():
        assert VALUE.encode() not in f.read_bytes(), f


def assert_value_nowhere(ctl: RecordingCtl, home: Path) -> None:
    """The value is in no file of the home (no symlinked shared stores) and in no output
    of the module's CLI calls so far."""
    ctl.ok("daemon", "status")  # the daemon is still up: its files are as they are now
    needle = VALUE.encode()
    checked = []
    for root, dirs, files in os.walk(home):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for f in files:
            p = Path(root, f)
            if p.is_symlink() or not p.is_file():
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue  # sockets, vanished files
            checked.append(p.name)
            leaked = needle in data
            assert not leaked, f"secret value found in {p}"
    assert {"state.db", "store.json", "mvmd.log"} <= set(checked), checked
    assert any(n.startswith("events.jsonl") for n in checked), checked
    assert ctl.captured, "no CLI output was captured"
    for r in ctl.captured:
        leaked = needle in r.out_b + r.err_b
        assert not leaked, f"secret value in the output of mvmctl {r.args[:2]}"


def test_value_is_nowhere_on_disk_or_in_output(ctl: RecordingCtl, sandbox: str, home: Path) -> None:
    """At whatever point of the module it runs (the ctl teardown checks again at the end)."""
    ctl.ok("exec", sandbox, "-e", "K=secret:api-key", "--", "sh", "-c", 'echo "$K"')
    assert_value_nowhere(ctl, home)
