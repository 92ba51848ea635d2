"""The Python SDK against real VMs: every method, the cookbook script in its three modes,
the IR round trip (compile -> replay equals live), errors, and the docs' examples.

The module runs its own mvmd under a private, short ``MVM_HOME`` (/tmp/mvsdk-*), sharing
root filesystems, kernels, initramfs and boot templates with the default store through
symlinks (image records are copied), so nothing is rebuilt. One sandbox (``shared``, a fixture) serves
the method tests in any order (the lifecycle test makes its own); the mode tests run scripts as subprocesses, as users do.
At the end every sandbox is removed, the daemon stopped, any QEMU or mvmd left for this
home killed by pid, and the home deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import mvm
from mvm.api import models as M
from mvm.errors import (
    CommandFailed,
    CommandTimeout,
    ImageNotFound,
    InvalidArgument,
    PolicyDenied,
    SandboxNotFound,
    SnapshotNotFound,
)
from mvm.sdk import mode
from tests.cookbook import COOKBOOK
from tests.integration.mvmd_home import private_home

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SECRET_VALUE = "s3cr3t-" + os.urandom(6).hex()
IMAGE = "python-3.11"
SCRIPT_TIMEOUT = 240


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A private mvmd home, made the process's MVM_HOME (the SDK finds its daemon there)."""
    with private_home("mvsdk-") as h:
        old = {k: os.environ.get(k) for k in ("MVM_HOME", "MVM_RUN_DIR", "MVM_SDK_MODE")}
        os.environ["MVM_HOME"] = str(h)
        for k in ("MVM_RUN_DIR", "MVM_SDK_MODE"):
            os.environ.pop(k, None)
        mode._backend = None  # the process-wide backend is made for this home
        try:
            yield h
        finally:
            mode._backend = None
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def mvmctl(
    home: Path, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvm.cli.main", *args],
        env={**os.environ, "MVM_HOME": str(home), **env},
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )


def python(home: Path, script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python script.py`` (live mode, no mvmctl), bounded."""
    return subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "MVM_HOME": str(home), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
        cwd="/",
    )


@pytest.fixture(scope="module")
def secret(home: Path) -> str:
    """The cookbook's secret ``api-key``, stored with the CLI."""
    r = mvmctl(home, "secret", "put", "api-key", input=SECRET_VALUE + "\n")
    assert r.returncode == 0, r.stderr
    assert SECRET_VALUE not in r.stdout + r.stderr
    return "api-key"


@pytest.fixture(scope="module")
def shared(home: Path, secret: str) -> Iterator[mvm.Sandbox]:
    sb = mvm.Sandbox.create(
        IMAGE,
        name="sdk-shared",
        workload_id="sdk-tests",
        ttl="20m",
        tags={"team": "x"},
        env={"MODE": "dev"},
        network=mvm.network(mode="deny"),
    )
    try:
        yield sb
    finally:
        try:
            sb.destroy()
        except SandboxNotFound:
            pass


# ------------------------------------------------------------------------------ sandboxes


def test_create_info_list_connect(shared: mvm.Sandbox) -> None:
    info = shared.info()
    assert (info.name, info.state, info.image) == ("sdk-shared", "running", IMAGE)
    assert info.network.preset == "none"
    assert (info.workload_id, info.tags) == ("sdk-tests", {"team": "x"})
    assert 0 < info.ttl_left <= 20 * 60
    assert "sdk-shared" in [s.name for s in mvm.Sandbox.list()]
    again = mvm.Sandbox.connect("sdk-shared")
    assert again.id == shared.id and again.state == "running"
    with pytest.raises(SandboxNotFound):
        mvm.Sandbox.connect("no-such-sandbox")
    shared.set_ttl("30m")
    assert shared.info().ttl_left > 20 * 60


def test_unknown_image_names_the_known_ones(home: Path) -> None:
    with pytest.raises(ImageNotFound) as ei:
        mvm.Sandbox.create("python-3.12")
    assert "python-3.11" in ei.value.message and "python-3.13" in ei.value.message


def test_invalid_durations_fail_at_the_call(shared: mvm.Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="invalid ttl"):
        mvm.Sandbox.create(IMAGE, ttl="soon")
    with pytest.raises(InvalidArgument, match="timeout_seconds"):
        shared.commands.run(["true"], timeout_seconds="-1s")
    with pytest.raises(InvalidArgument):
        shared.set_ttl("forever")


# ------------------------------------------------------------------------------- commands


def test_run_returns_a_typed_result(shared: mvm.Sandbox) -> None:
    r = shared.commands.run(
        ["sh", "-c", "echo out-$MODE-$EXTRA; echo err >&2; exit 3"], env={"EXTRA": "e"}
    )
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out-dev-e\n", "err\n")
    assert not r.truncated and not r.timed_out and not r.placeholder
    assert r.audit_id is not None and re.fullmatch(r"\d+-[0-9a-f]{12}", r.audit_id), r.audit_id
    big = shared.commands.run(["python3", "-c", "print('x' * 5000)"], output_limit=1000)
    assert big.truncated and len(big.stdout_bytes) == 1000
    piped = shared.commands.run(["cat"], stdin=b"from stdin")
    assert piped.stdout == "from stdin"
    assert shared.commands.run("echo $((6 * 7))").stdout == "42\n"  # a str runs under sh -c


def test_check_true_raises_command_failed_with_the_result(shared: mvm.Sandbox) -> None:
    assert shared.commands.run(["false"]).exit_code == 1  # no check: a result
    with pytest.raises(CommandFailed) as ei:
        shared.commands.run(["sh", "-c", "echo why >&2; exit 4"], check=True)
    assert ei.value.data["exit_code"] == 4
    assert ei.value.result.stderr == "why\n"  # type: ignore[attr-defined]


def test_timeout_raises_command_timeout(shared: mvm.Sandbox) -> None:
    with pytest.raises(CommandTimeout) as ei:
        shared.commands.run(["sh", "-c", "echo started; sleep 30"], timeout_seconds="1s")
    assert ei.value.result.timed_out  # type: ignore[attr-defined]
    assert shared.commands.run(["true"]).exit_code == 0  # the sandbox is fine afterwards


def test_start_handle_streams_waits_and_takes_stdin(shared: mvm.Sandbox) -> None:
    h = shared.commands.start(["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.3; done"])
    assert h.pid > 0
    assert b"".join(h.stdout) == b"line1\nline2\nline3\n"
    res = h.wait(timeout_seconds=30)
    assert (res.exit_code, res.stdout) == (0, "line1\nline2\nline3\n")
    cat = shared.commands.start(["cat"], stdin_open=True)
    cat.send_stdin(b"hello ")
    cat.send_stdin(b"stdin", eof=True)
    assert cat.wait(30).stdout == "hello stdin"
    quiet = shared.commands.start(["python3", "-c", "import sys; print('e', file=sys.stderr)"])
    assert b"".join(quiet.stderr) == b"e\n"
    closed = shared.commands.start(["true"])
    with pytest.raises(InvalidArgument, match="stdin_open"):
        closed.send_stdin(b"x")


def test_kill_and_wait_timeout(shared: mvm.Sandbox) -> None:
    h = shared.commands.start(["sleep", "300"])
    with pytest.raises(CommandTimeout):
        h.wait(timeout_seconds=0.5)
    h.kill()
    res = h.wait(30)
    assert (res.signal, res.exit_code) == (9, 137)


# ---------------------------------------------------------------------------------- files


def test_files_round_trip(shared: mvm.Sandbox) -> None:
    shared.files.write("/app/main.py", "print('hello from mvm')")  # /app is made
    assert shared.commands.run(["python", "/app/main.py"]).stdout == "hello from mvm\n"
    shared.files.write("/work/input.json", b"{}")
    assert shared.files.read("/work/input.json") == b"{}"
    entries = {e.name: e for e in shared.files.list("/work")}
    e = entries["input.json"]
    assert (e.type, e.size) == ("file", 2) and e.mode & 0o777 == 0o644 and e.mtime > 0
    assert shared.files.stat("/work/input.json").size == 2
    assert shared.files.exists("/work/input.json") and not shared.files.exists("/work/nope")
    shared.files.mkdir("/work/d/e")
    shared.files.rename("/work/input.json", "/work/d/e/moved.json")
    assert not shared.files.exists("/work/input.json")
    assert shared.files.read("/work/d/e/moved.json") == b"{}"
    shared.files.remove("/work/d", recursive=True)
    assert not shared.files.exists("/work/d")
    with pytest.raises(InvalidArgument):
        shared.files.write("relative.txt", "x")


# ------------------------------------------------------------------------ secrets and logs


def test_secret_reaches_the_command_and_never_its_output(shared: mvm.Sandbox) -> None:
    ref = mvm.secret("api-key")
    assert SECRET_VALUE not in repr(ref)
    digest = "import hashlib, os; print(hashlib.sha256(os.environ['API_KEY'].encode()).hexdigest())"
    r = shared.commands.run(["python3", "-c", digest], env={"API_KEY": ref})
    assert r.stdout.strip() == hashlib.sha256(SECRET_VALUE.encode()).hexdigest()  # it arrived
    r = shared.commands.run(["sh", "-c", 'echo "key:$API_KEY"'], env={"API_KEY": ref})
    assert r.stdout.startswith("key:") and SECRET_VALUE not in r.stdout + r.stderr
    h = shared.commands.start(["sh", "-c", 'echo "bg:$API_KEY"'], env={"API_KEY": ref})
    assert SECRET_VALUE not in h.wait(30).stdout
    logs = [ev.message for ev in shared.logs()]
    assert any("bg:" in m for m in logs)
    assert not any(SECRET_VALUE in m for m in logs)


def test_logs_follow_and_redact(shared: mvm.Sandbox) -> None:
    """A line carrying the secret comes through ``logs(follow=True)`` with the value
    replaced by its mark; the test fails if the line never comes (bounded wait)."""
    token = f"follow-{secrets.token_hex(4)}"
    h = shared.commands.start(
        ["sh", "-c", f'echo "{token}:$API_KEY"'], env={"API_KEY": mvm.secret("api-key")}
    )
    h.wait(30)
    seen: list[M.LogEvent] = []
    found: list[M.LogEvent] = []

    def follow() -> None:  # stops itself at the line; the main thread only waits, bounded
        events = shared.logs(follow=True, redact=True)
        for ev in events:
            seen.append(ev)
            if token in ev.message:
                found.append(ev)
                break
        events.close()  # type: ignore[attr-defined]

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"the line never came through logs(follow=True): {seen[-5:]}"
    [ev] = found
    assert ev.message == f"{token}:[REDACTED:api-key]"
    assert ev.timestamp > 0 and ev.stream.endswith(":stdout")
    assert not any(SECRET_VALUE in e.message for e in seen)
    with pytest.raises(InvalidArgument):
        shared.logs(redact=False)


# ---------------------------------------------------------------------------------- ports


def test_ports_forward_to_a_guest_server(shared: mvm.Sandbox) -> None:
    shared.files.write("/work/www/index.html", "served by the guest")
    server = shared.commands.start(
        ["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", "/work/www"]
    )
    with pytest.raises(PolicyDenied):
        shared.ports.forward(guest_port=8000, host="0.0.0.0")
    fwd = shared.ports.forward(host="127.0.0.1", host_port=0, guest_port=8000)
    try:
        assert fwd.host == "127.0.0.1" and fwd.host_port > 0
        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{fwd.host_port}/index.html"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = resp.read()
                break
            except OSError:
                time.sleep(0.3)  # the server is still starting
        assert body == b"served by the guest"
    finally:
        fwd.close()
        server.kill()
    assert fwd.id not in [f.id for f in shared.info().forwards]


# ------------------------------------------------------------------------------ async twin


def test_async_sandbox_shares_the_implementation(shared: mvm.Sandbox) -> None:
    async def main() -> tuple[str, bytes, list[bytes], str]:
        sb = await mvm.AsyncSandbox.connect("sdk-shared")
        res = await sb.commands.run(["echo", "async"])
        await sb.files.write("/work/async.txt", "a")
        data = await sb.files.read("/work/async.txt")
        h = await sb.commands.start(["sh", "-c", "echo one; echo two"])
        chunks = [c async for c in h.stdout]
        await h.wait()
        info = await sb.info()
        return res.stdout, data, chunks, info.state

    out, data, chunks, state = asyncio.run(asyncio.wait_for(main(), 120))
    assert (out, data, b"".join(chunks), state) == ("async\n", b"a", b"one\ntwo\n", "running")


# ---------------------------------------------------------- lifecycle (its own sandbox)


def test_snapshot_pause_resume_stop_destroy(shared: mvm.Sandbox) -> None:
    """On a sandbox of its own: the shared one stays for the other tests, in any order."""
    own = mvm.Sandbox.create(IMAGE, name="sdk-life", ttl="20m", network=mvm.network(mode="deny"))
    try:
        snapshot_pause_resume_stop_destroy(own)
    finally:
        try:
            own.destroy()
        except SandboxNotFound:
            pass


def snapshot_pause_resume_stop_destroy(sb: mvm.Sandbox) -> None:
    sb.files.write("/work/before.txt", "kept")
    snap = sb.snapshot(name="after-index")
    assert snap.id == "after-index" and snap.size > 0
    sb.files.write("/work/after.txt", "dropped by the restore")
    sb.pause()
    assert sb.state == "paused"
    sb.resume()
    assert sb.state == "running"
    sb.resume(snapshot=snap.id)
    assert sb.state == "running"
    assert sb.files.exists("/work/before.txt") and not sb.files.exists("/work/after.txt")
    sb.stop()  # the VM goes; the snapshot stays
    with pytest.raises(SandboxNotFound):
        sb.info()
    sb.resume(snapshot=snap)  # recreated from the snapshot
    assert sb.files.read("/work/before.txt") == b"kept"
    sb.destroy()
    assert "sdk-life" not in [s.name for s in mvm.Sandbox.list()]
    with pytest.raises(SnapshotNotFound):  # the snapshot went with destroy
        sb.resume(snapshot=snap)


# ------------------------------------------------------------------- modes and the IR


@pytest.fixture(scope="module")
def project(home: Path) -> Path:
    p = home / "project"
    (p / "src" / "pkg").mkdir(parents=True)
    (p / "src" / "app.py").write_text("import json\nprint(json.dumps({'ok': 1}))\n")
    (p / "src" / "pkg" / "data.txt").write_text("data\n")
    for image in ("python-3.12", "python-3.11"):
        (p / f"{image}.py").write_text(COOKBOOK.replace('"IMAGE"', f'"{image}"'))
    return p


def test_cookbook_script_in_all_three_modes(home: Path, project: Path, secret: str) -> None:
    script = str(project / "python-3.11.py")
    plan = mvmctl(home, "run", "--mode", "plan", script)
    assert plan.returncode == 0, plan.stderr
    assert "admission  allow" in plan.stdout and "secrets    api-key" in plan.stdout
    assert SECRET_VALUE not in plan.stdout + plan.stderr
    out = project / "ir"
    comp = mvmctl(home, "compile", script, "--out", str(out))
    assert comp.returncode == 0, comp.stderr
    assert SECRET_VALUE.encode() not in (out / "ir.json").read_bytes()
    live = mvmctl(home, "run", "--mode", "live", script)
    assert live.returncode == 0, live.stderr
    replay = mvmctl(home, "run", "--mode", "live", str(out))
    assert replay.returncode == 0, replay.stderr
    plain = python(home, project / "python-3.11.py")
    assert plain.returncode == 0, plain.stderr
    left = [s for s in json.loads(mvmctl(home, "ls", "--json").stdout) if s["name"] != "sdk-shared"]
    assert left == []  # the with block stopped every one of them


def test_cookbook_python_312_fails_clearly_in_every_mode(home: Path, project: Path) -> None:
    script = str(project / "python-3.12.py")
    for args in (("run", "--mode", "plan", script), ("run", "--mode", "live", script)):
        r = mvmctl(home, *args)
        assert r.returncode == ImageNotFound.exit_code, r
        assert "unknown image 'python-3.12'" in r.stderr
        assert "python-3.11" in r.stderr and "python-3.13" in r.stderr
        assert "Traceback" not in r.stderr
    r = python(home, project / "python-3.12.py")
    assert r.returncode == 1 and "python-3.13" in r.stderr, r  # the uncaught ImageNotFound


ROUND_TRIP = """import mvm
with mvm.Sandbox.create("python-3.11", include=["src"], env={"MODE": "rt"}) as sb:
    sb.files.write("/work/input.json", b'{"n": 21}')
    r = sb.commands.run(["python", "-c", "import json,os; d=json.load(open('/work/input.json'));"
                         "open('/work/output.json','w').write(json.dumps({'n': d['n']*2, 'm': os.environ['MODE']}))"])
    print(r.stdout, end="")
    print(sb.commands.run(["python", "/work/src/app.py"]).stdout, end="")
    print(sb.commands.run(["sh", "-c", "cat /work/src/pkg/data.txt; ls -R /work | sort"]).stdout, end="")
    sb.files.read("/work/output.json")
    sb.files.list("/work")
    sb.files.rename("/work/output.json", "/work/result.json")
    print(sb.commands.run(["cat", "/work/result.json"]).stdout, end="")
    sb.files.remove("/work/input.json")
    print(sb.commands.run(["ls", "/work"]).stdout, end="")
"""


def test_compile_then_replay_equals_live(home: Path, project: Path) -> None:
    script = project / "roundtrip.py"
    script.write_text(ROUND_TRIP)
    live_trace, replay_trace = project / "live.trace", project / "replay.trace"
    live = python(home, script, MVM_SDK_TRACE=str(live_trace))
    assert live.returncode == 0, live.stderr
    assert '{"n": 42, "m": "rt"}' in live.stdout and "data\n" in live.stdout
    out = project / "rt-ir"
    comp = mvmctl(home, "compile", str(script), "--out", str(out))
    assert comp.returncode == 0, comp.stderr
    replay = mvmctl(home, "run", "--mode", "live", str(out), MVM_SDK_TRACE=str(replay_trace))
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == live.stdout.strip()  # the same command outputs
    a = [json.loads(x) for x in live_trace.read_text().splitlines()]
    b = [json.loads(x) for x in replay_trace.read_text().splitlines()]
    assert a == b and len(a) >= 10  # the same operations with the same results


# ------------------------------------------------------------------------------- the docs


def doc_examples() -> list[str]:
    text = (ROOT / "docs" / "sdk.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_examples_run(home: Path, secret: str, tmp_path: Path) -> None:
    blocks = doc_examples()
    assert len(blocks) >= 3
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tool.py").write_text("print('tool ran')\n")
    for i, block in enumerate(blocks):
        f = tmp_path / f"example_{i}.py"
        f.write_text(block)
        r = python(home, f)
        assert r.returncode == 0, f"docs/sdk.md example {i}:\n{block}\n{r.stdout}\n{r.stderr}"
