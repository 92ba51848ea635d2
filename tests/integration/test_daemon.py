"""Named sandboxes end to end: ``mvmctl`` subprocesses talking to a real mvmd and real VMs.

The module runs its own daemon under a private, short ``MVM_HOME`` (/tmp/mvmd-*): it never
touches a user's daemon or sandboxes. Root filesystems, kernels, initramfs and boot
templates are shared with the default store through symlinks and its image records are
copied, so nothing is rebuilt. At the end every
sandbox is removed, the daemon is stopped, any QEMU left with the home in its command line
is killed and the home is deleted.

One sandbox is shared to keep the module fast, through a fixture, so the tests pass in any
order and alone (``-k``):

- ``worker`` (the ``worker`` fixture: ``init --preset worker``, ``build``, ``up``): exec,
  fs, cp, concurrency, proc, logs, daemon restart, pause/resume, bad input. Tests leave it
  running and clean up what they start in it.
- every other sandbox (parallel ups, snapshots, a killed QEMU, TTLs, resources, races) is
  made by the test that needs it and removed by it.

At the end (the ``ctl`` fixture's teardown) ``down --all`` and ``daemon stop`` must leave
no QEMU, run directory, socket or daemon behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mvm import errors
from mvm.api import models as M
from mvm.client import Client, check_socket_owner
from tests.integration.mvmd_home import (
    CMD_TIMEOUT,
    MVMCTL,
    Ctl,
    Res,
    daemon_pids,
    pid_alive,
    private_home,
    qemu_pids,
    wait_until,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

#: ttl-b's first TTL: it counts from creation, so it must outlast a boot on a loaded host.
FIRST_TTL = 60
#: The TTL ``set-ttl`` gives ttl-b while ``wait`` waits for it (time for ``wait`` to connect).
SHORT_TTL = 15

# ----------------------------------------------------------------------------- helpers


def guest_int(ctl: Ctl, name: str, script: str) -> int:
    r = ctl.sh(name, script)
    assert r.rc == 0, str(r)
    return int(r.out.strip())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmd-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Iterator[Ctl]:
    """The CLI for this home; its teardown checks that everything goes away."""
    c = Ctl(home)
    yield c
    down_all_and_stop_leave_nothing_behind(c, home)


def down_all_and_stop_leave_nothing_behind(ctl: Ctl, home: Path) -> None:
    names = set(ctl.sandboxes())
    r = ctl.ok("down", "--all")
    assert sorted(r.out.splitlines()) == sorted(f"{n}: removed" for n in names)
    assert ctl.sandboxes() == {}
    assert wait_until(lambda: not qemu_pids(home), 60), [
        (pid, Path(f"/proc/{pid}/cmdline").read_bytes()) for pid in qemu_pids(home)
    ]
    assert [p.name for p in (home / "run").iterdir()] == []
    pid = ctl.daemon_pid()
    assert ctl.ok("daemon", "stop").out == f"mvmd stopped (pid {pid})\n"
    assert wait_until(lambda: not pid_alive(pid), 60)
    assert not (home / "mvmd.sock").exists()
    assert ctl("daemon", "status").rc == 1


@pytest.fixture(scope="module")
def project(home: Path) -> Path:
    """``mvmctl init --preset worker`` output; the directory name is the image name."""
    return home / "proj" / "mvmit-worker"


@dataclass
class Worker:
    """The shared sandbox and what making it printed."""

    name: str
    token: str
    init: Res
    build: Res
    up: Res
    #: init and build started mvmd (they must not: neither needs it). Only seen when
    #: no earlier test in the module had started it (the order is random).
    build_started_daemon: bool


@pytest.fixture(scope="module")
def worker_made(ctl: Ctl, project: Path, home: Path) -> Worker:
    """``init --preset worker``, ``build`` and ``up`` of the shared sandbox ``worker``
    (MODE=dev and a random TOKEN in its environment)."""
    sock = home / "mvmd.sock"
    before = sock.exists()
    init = ctl.ok("init", str(project), "--preset", "worker")
    build = ctl.ok("build", str(project), timeout=600)
    started = not before and sock.exists()
    token = secrets.token_hex(4)
    up = ctl.ok(
        "up", str(project), "--name", "worker", "--ttl", "2h", "-e", "MODE=dev",
        "-e", f"TOKEN={token}", timeout=300,
    )  # fmt: skip
    return Worker("worker", token, init, build, up, started)


@pytest.fixture
def worker(worker_made: Worker, ctl: Ctl) -> str:
    """The shared sandbox, running (each test gets it as the tests before it left it)."""
    state = ctl.sandboxes().get("worker", {}).get("state")
    assert state == "running", f"the shared sandbox is {state!r}: an earlier test broke it"
    return worker_made.name


@contextlib.contextmanager
def sandbox(ctl: Ctl, name: str, *args: str) -> Iterator[str]:
    """``up --name NAME ARGS`` for one test; removed after it (whatever happened)."""
    ctl.ok("up", "--name", name, *args, timeout=300)
    try:
        yield name
    finally:
        ctl("down", name)


@pytest.fixture
def client(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """Client objects for this home are made with MVM_HOME set (the socket path is fixed then)."""
    monkeypatch.setenv("MVM_HOME", str(home))
    monkeypatch.delenv("MVM_RUN_DIR", raising=False)
    with Client(autostart=False) as c:
        yield c


# ----------------------------------------------------------------------------- 1. init/build/up


def test_init_build_up_runs_the_task_with_its_env(
    ctl: Ctl, project: Path, home: Path, worker_made: Worker, worker: str
) -> None:
    assert (project / "mvm.toml").is_file() and (project / "task.py").is_file()
    assert "mvmit-worker" in worker_made.build.out
    assert not worker_made.build_started_daemon, "init/build must not need the daemon"
    token = worker_made.token
    r = worker_made.up
    assert r.out.startswith("worker  sb-"), str(r)
    assert "running" in r.out and "1 files in /work" in r.out
    # the first command that needs it auto-started mvmd in this home, socket 0600
    sock = home / "mvmd.sock"
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
    assert pid_alive(ctl.daemon_pid())

    ctl.ok("fs", "write", "worker", "/work/in.json", input='{"job": 7}')
    r = ctl.ok("exec", "worker", "--", "python", "/work/task.py")
    assert "hello from" in r.out and "'mode': 'dev'" in r.out, str(r)
    assert json.loads(ctl.ok("fs", "read", "worker", "/work/out.json").out) == {
        "received": {"job": 7},
        "mode": "dev",
    }
    r = ctl.ok("exec", "worker", "--", "sh", "-c", 'echo "$MODE $TOKEN"; id -u; pwd')
    assert r.out.splitlines() == [f"dev {token}", "1000", "/work"]


def test_ls_json_shows_the_sandbox(ctl: Ctl, worker: str) -> None:
    s = ctl.sandboxes()["worker"]
    assert s["name"] == "worker"
    assert s["id"].startswith("sb-")
    assert s["image"] == "mvmit-worker"
    assert s["state"] == "running"
    assert s["expires_at"] - s["created"] == pytest.approx(2 * 3600, abs=1e-3)  # --ttl 2h
    assert 0 < s["ttl_left"] <= 2 * 3600
    assert s["cpus"] == 1 and s["memory_mb"] == 512
    assert s["pid"] and pid_alive(s["pid"])
    r = ctl.ok("ls")  # the table names it too
    assert "worker" in r.out and "running" in r.out


# ----------------------------------------------------------------------------- 2. exec


def test_exec_keeps_streams_apart_and_the_exit_code(ctl: Ctl, worker: str) -> None:
    r = ctl.sh("worker", "echo out; echo err >&2; echo out2; exit 7")
    assert r.rc == 7, str(r)
    assert r.out == "out\nout2\n"
    assert r.err == "err\n"
    r = ctl("exec", "worker", "--", "no-such-command")
    assert r.rc == 127 and "no-such-command" in r.err, str(r)


def test_exec_options_and_json(ctl: Ctl, worker: str) -> None:
    r = ctl("exec", "--json", "worker", "--", "sh", "-c", "echo o; echo e >&2; exit 3")
    assert r.rc == 3, str(r)
    obj = json.loads(r.out)  # all of stdout is one JSON object
    assert obj["sandbox"] == "worker" and obj["exit_code"] == 3
    assert obj["stdout"] == "o\n" and obj["stderr"] == "e\n"
    assert obj["timed_out"] is False and obj["truncated"] == {"stdout": False, "stderr": False}
    script = 'echo "$X|$MODE"; id -u; pwd'
    r = ctl.ok(
        "exec", "--user", "root", "--cwd", "/tmp", "-e", "X=1", "worker", "--", "sh", "-c", script
    )
    assert r.out.splitlines() == ["1|dev", "0", "/tmp"]


def test_exec_streams_output_while_the_command_runs(ctl: Ctl, worker: str) -> None:
    """The command prints "first" and then waits for a file the test makes only after it
    has read that line: output held back until the end would never come (exit 3)."""
    gate = f"/tmp/it-gate-{secrets.token_hex(4)}"
    script = (
        f"echo first; i=0; while [ ! -e {gate} ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 3; "
        f"sleep 0.05; done; rm -f {gate}; echo second"
    )
    p = ctl.popen("exec", "worker", "--", "sh", "-c", script)
    try:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 60)
        assert ready, "no output within 60 s"
        line = p.stdout.readline()
        assert line == b"first\n"
        assert p.poll() is None, "the first line only came when the command ended"
        ctl.ok("exec", "worker", "--", "touch", gate)
        rest, _ = p.communicate(timeout=60)
        assert rest == b"second\n" and p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_exec_interactive_passes_stdin(ctl: Ctl, worker: str) -> None:
    data = b"line one\nline two\n" + bytes(range(256)) * 40
    r = ctl("exec", "-i", "worker", "--", "cat", input=data)
    assert r.rc == 0, str(r)
    assert r.out_b == data
    r = ctl("exec", "-i", "worker", "--", "wc", "-c", input=b"x" * 100_000)
    assert r.out.strip() == "100000"


def test_exec_unknown_sandbox_is_125(ctl: Ctl) -> None:
    r = ctl("exec", "no-such-box", "--", "true")
    assert r.rc == 125, str(r)
    assert "no sandbox named 'no-such-box'" in r.err
    assert r.out == ""


def test_exec_timeout_is_124(ctl: Ctl, worker: str) -> None:
    # sleep 600 against the CLI call's bound (CMD_TIMEOUT): a timeout that never fired fails
    r = ctl("exec", "worker", "--timeout", "1", "--", "sleep", "600")
    assert r.rc == 124, str(r)
    assert "timed out" in r.err
    assert ctl.ok("exec", "worker", "--", "echo", "still-here").out == "still-here\n"


# ----------------------------------------------------------------------------- 3. fs and cp


def test_fs_write_read_round_trip_with_binary_bytes(ctl: Ctl, worker: str) -> None:
    data = bytes(range(256)) * 64 + b"\x00\xff\r\n" + os.urandom(300_000)  # > 1 frame
    r = ctl.ok("fs", "write", "worker", "/work/bin.dat", input=data)
    assert f"{len(data)} bytes" in r.out
    assert ctl.ok("fs", "read", "worker", "/work/bin.dat").out_b == data
    r = ctl.ok("exec", "worker", "--", "sha256sum", "/work/bin.dat")
    assert r.out.split()[0] == hashlib.sha256(data).hexdigest()
    ctl.ok("fs", "write", "worker", "/work/empty", input=b"")
    assert ctl.ok("fs", "read", "worker", "/work/empty").out_b == b""


def test_fs_ls_stat_mkdir_mv_rm(ctl: Ctl, worker: str) -> None:
    ctl.ok("fs", "mkdir", "-p", "worker", "/work/t/a/b/c")
    r = ctl("fs", "mkdir", "worker", "/work/t/x/y")
    assert r.rc == 125 and "No such file" in r.err, str(r)
    ctl.ok("fs", "write", "--mode", "600", "worker", "/work/t/a/b/c/f.txt", input="hello")
    st = json.loads(ctl.ok("fs", "stat", "worker", "/work/t/a/b/c/f.txt").out)
    assert st["type"] == "file" and st["size"] == 5 and st["mode"] & 0o777 == 0o600
    assert st["uid"] == 1000  # files are given to the guest user
    assert json.loads(ctl.ok("fs", "stat", "worker", "/work/t/a").out)["type"] == "dir"
    entries = {e["name"]: e for e in ctl.json("fs", "ls", "worker", "/work/t/a/b/c")}
    assert set(entries) == {"f.txt"} and entries["f.txt"]["size"] == 5
    assert "f.txt" in ctl.ok("fs", "ls", "worker", "/work/t/a/b/c").out

    ctl.ok("fs", "mv", "worker", "/work/t/a/b/c/f.txt", "/work/t/g.txt")
    assert ctl.ok("fs", "read", "worker", "/work/t/g.txt").out == "hello"
    assert ctl("fs", "stat", "worker", "/work/t/a/b/c/f.txt").rc == 125
    r = ctl("fs", "rm", "worker", "/work/t/a")
    assert r.rc == 125 and "not empty" in r.err.lower(), str(r)
    ctl.ok("fs", "rm", "-r", "worker", "/work/t/a")
    ctl.ok("fs", "rm", "worker", "/work/t/g.txt")
    assert ctl.json("fs", "ls", "worker", "/work/t") == []
    # and the guest agrees
    assert ctl.ok("exec", "worker", "--", "ls", "-A", "/work/t").out == ""


def test_fs_read_of_a_missing_path_fails_clearly(ctl: Ctl, worker: str) -> None:
    r = ctl("fs", "read", "worker", "/work/does-not-exist")
    assert r.rc == 125, str(r)
    assert "/work/does-not-exist" in r.err and "No such file" in r.err
    assert r.out_b == b""
    r = ctl("fs", "read", "worker", "/work")
    assert r.rc == 125 and "directory" in r.err, str(r)


def test_fs_write_over_the_limit_fails_clearly(ctl: Ctl, worker: str) -> None:
    assert M.MAX_FILE_WRITE == 64 * 1024 * 1024
    script = f'head -c {M.MAX_FILE_WRITE + 1} /dev/zero | "$@"'
    p = subprocess.run(
        ["sh", "-c", script, "sh", *MVMCTL, "fs", "write", "worker", "/work/too-big"],
        capture_output=True,
        timeout=CMD_TIMEOUT,
        env=ctl.env,
        check=False,
    )
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert "larger than the limit of 64 MiB" in err
    assert ctl("fs", "stat", "worker", "/work/too-big").rc == 125  # nothing was written


def test_cp_between_host_and_guest(ctl: Ctl, home: Path, worker: str) -> None:
    local = home / "cp-src"
    local.mkdir()
    f = local / "notes.txt"
    payload = b"notes \x00\x01 " + os.urandom(5000)
    f.write_bytes(payload)
    f.chmod(0o640)
    ctl.ok("fs", "mkdir", "-p", "worker", "/work/inbox")

    r = ctl.ok("cp", str(f), "worker:/work/inbox/")  # into a directory (trailing slash)
    assert "worker:/work/inbox/notes.txt" in r.out
    assert ctl.ok("fs", "read", "worker", "/work/inbox/notes.txt").out_b == payload
    st = json.loads(ctl.ok("fs", "stat", "worker", "/work/inbox/notes.txt").out)
    assert st["mode"] & 0o777 == 0o640
    ctl.ok("cp", str(f), "worker:/work/inbox")  # an existing directory without the slash
    assert [e["name"] for e in ctl.json("fs", "ls", "worker", "/work/inbox")] == ["notes.txt"]
    ctl.ok("cp", str(f), "worker:/work/inbox/renamed.txt")
    assert ctl.ok("fs", "read", "worker", "/work/inbox/renamed.txt").out_b == payload

    out_dir = home / "cp-out"
    out_dir.mkdir()
    ctl.ok("cp", "worker:/work/inbox/renamed.txt", str(out_dir))  # into a host directory
    assert (out_dir / "renamed.txt").read_bytes() == payload
    ctl.ok("cp", "worker:/work/inbox/notes.txt", str(out_dir / "result.txt"))  # a new name
    assert (out_dir / "result.txt").read_bytes() == payload

    r = ctl("cp", str(local), "worker:/work/")  # a host directory: refused
    assert r.rc == 2, str(r)
    assert "is a directory" in r.err
    r = ctl("cp", str(home / "missing.txt"), "worker:/work/")
    assert r.rc == 2 and "no such file" in r.err, str(r)
    r = ctl("cp", str(f), str(out_dir))
    assert r.rc == 2 and "NAME:/path" in r.err, str(r)
    r = ctl("cp", "worker:/work/nope", str(out_dir))
    assert r.rc == 125 and "No such file" in r.err, str(r)
    assert not (out_dir / "nope").exists()


def test_cp_into_a_missing_host_directory_fails_clearly(ctl: Ctl, home: Path, worker: str) -> None:
    ctl.ok("fs", "write", "worker", "/work/cp-missing.txt", input="x")
    r = ctl("cp", "worker:/work/cp-missing.txt", str(home / "no-such-dir") + "/")
    assert r.rc == 2, str(r)
    assert "Traceback" not in r.err
    assert "no-such-dir" in r.err


# ----------------------------------------------------------------------------- 4. concurrency


@pytest.mark.timeout(900)
def test_twenty_concurrent_execs_get_their_own_output(client: Client, worker: str) -> None:
    """Output integrity under concurrency; the bounds are hang checks only (20 execs at
    once on a loaded TCG host can take minutes: 120 s was too tight at load 9)."""
    n, lines = 20, 400
    results: dict[int, tuple[int | None, bytes, bytes]] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            script = f"for k in $(seq {lines}); do echo T{i}-$k; echo E{i}-$k >&2; done"
            req = M.ExecRequest(argv=["sh", "-c", script], timeout=600)
            out = {"stdout": bytearray(), "stderr": bytearray()}
            code = None
            with Client(autostart=False) as c:
                barrier.wait(120)
                for ev in c.exec_stream("worker", req):
                    if ev.type in out:
                        out[ev.type] += ev.data
                    elif ev.type == "exit":
                        code = ev.exit_code
            results[i] = (code, bytes(out["stdout"]), bytes(out["stderr"]))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(700)
    assert not any(t.is_alive() for t in threads), "an exec did not finish"
    assert not failures, failures
    for i in range(n):
        want_out = "".join(f"T{i}-{k}\n" for k in range(1, lines + 1)).encode()
        want_err = "".join(f"E{i}-{k}\n" for k in range(1, lines + 1)).encode()
        code, out, err = results[i]
        assert code == 0
        assert out == want_out, f"exec {i}: stdout mixed up or incomplete"
        assert err == want_err, f"exec {i}: stderr mixed up or incomplete"


def test_two_ups_in_parallel(ctl: Ctl) -> None:
    # Make the default shape's boot template first, so this measures two restores side by
    # side (two creates that both make one template: test_daemon_template_race.py).
    ctl.ok("up", "--name", "warm", "--ttl", "5m", timeout=300)
    ctl.ok("down", "warm")
    pa = ctl.popen("up", "--name", "par-a", "-e", "SNAPENV=one", "--ttl", "20m")
    pb = ctl.popen("up", "--name", "par-b", "--ttl", "20m")
    try:
        try:
            outs = [p.communicate(timeout=120) for p in (pa, pb)]
        finally:
            for p in (pa, pb):
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        assert pa.returncode == 0, outs[0]
        assert pb.returncode == 0, outs[1]
        boxes = ctl.sandboxes()
        a, b = boxes["par-a"], boxes["par-b"]
        assert a["state"] == b["state"] == "running"
        assert a["id"] != b["id"] and a["pid"] != b["pid"]
        assert a["image"] == "python-3.11"
        assert ctl.sh("par-a", 'echo "a:$SNAPENV"').out == "a:one\n"
        assert ctl.sh("par-b", 'echo "b:$SNAPENV"').out == "b:\n"
    finally:
        ctl("down", "par-a")
        ctl("down", "par-b")


# ----------------------------------------------------------------------------- 5. proc, logs


def test_background_process_lifecycle(ctl: Ctl, worker: str) -> None:
    r = ctl.ok(
        "proc", "start", "worker", "--", "sh", "-c", "while true; do echo tick; sleep 0.5; done"
    )
    pid = r.out.strip()
    assert pid.isdigit(), str(r)
    procs = {str(p["proc"]): p for p in ctl.json("proc", "ls", "worker")}
    assert procs[pid]["running"] is True and procs[pid]["exit_code"] is None
    assert f"{pid}  pid" in ctl.ok("proc", "ls", "worker").out
    assert wait_until(lambda: ctl("proc", "output", "worker", pid).out.count("tick") >= 2, 60)
    out = ctl.ok("proc", "output", "worker", pid).out
    assert set(out.splitlines()) == {"tick"}

    ctl.ok("proc", "signal", "worker", pid, "KILL")
    r = ctl("proc", "wait", "worker", pid, "--timeout", "20s")
    assert r.rc == 128 + 9, str(r)
    p = {str(p["proc"]): p for p in ctl.json("proc", "ls", "worker")}[pid]
    assert p["running"] is False and p["signal"] == 9 and p["ended"] is not None

    events = [json.loads(line) for line in ctl.ok("logs", "worker", "--json").out.splitlines()]
    ticks = [e for e in events if e["stream"] == f"proc:{pid}:stdout"]
    assert len(ticks) >= 2 and {e["message"] for e in ticks} == {"tick"}
    assert any(
        e["stream"] == "mvmd" and f"proc {pid} exited with 137" in e["message"] for e in events
    )
    assert f"proc:{pid}:stdout" in ctl.ok("logs", "worker").out

    r = ctl("proc", "wait", "worker", "999")
    assert r.rc == 125 and "no background process" in r.err, str(r)


def test_background_process_stdin(ctl: Ctl, worker: str) -> None:
    num = ctl.ok(
        "proc", "start", "--stdin-open", "worker", "--", "sh", "-c", "cat; exit 4"
    ).out.strip()
    r = ctl("proc", "wait", "worker", num, "--timeout", "1s")
    assert r.rc == 124 and "still running" in r.err, str(r)
    ctl.ok("proc", "stdin", "worker", num, input="first\n")
    ctl.ok("proc", "stdin", "--eof", "worker", num, input="second\n")
    r = ctl("proc", "wait", "worker", num, "--timeout", "20s")
    assert r.rc == 4, str(r)
    assert ctl.ok("proc", "output", "worker", num).out == "first\nsecond\n"


def test_logs_follow_streams_new_lines(ctl: Ctl, worker: str) -> None:
    token = f"FOLLOW-{secrets.token_hex(4)}"
    follower = ctl.popen("logs", "worker", "-f")
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=30)  # the existing log comes first
        assert first
        assert token.encode() not in first
        ctl.ok("proc", "start", "worker", "--", "sh", "-c", f"sleep 0.5; echo {token}")
        deadline = time.monotonic() + 30
        seen = b""
        while token.encode() not in seen:
            seen = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert b"proc:" in seen
        assert follower.poll() is None, "logs -f ended instead of following"
    finally:
        follower.kill()
        follower.wait(10)


# ----------------------------------------------------------------------------- 6. mvmd -9


def test_kill_9_daemon_then_the_next_command_reattaches(ctl: Ctl, home: Path, worker: str) -> None:
    ctl.ok("fs", "write", "worker", "/work/before-kill.txt", input="still here")
    r = ctl.ok(
        "proc", "start", "worker", "--", "sh", "-c",
        "i=0; while true; do i=$((i+1)); echo n$i; sleep 0.3; done",
    )  # fmt: skip
    num = r.out.strip()
    before = ctl.sandboxes()
    old = ctl.daemon_pid()
    assert (home / "mvmd.lock").read_text().strip() == str(old)

    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(old), 60)
    assert ctl("daemon", "status", "--json", timeout=30).rc == 1  # nobody answers now
    for s in before.values():  # sandboxes outlive the daemon
        assert pid_alive(s["pid"]), s

    # the next command starts a new daemon, which adopts every running QEMU
    procs = {str(p["proc"]): p for p in ctl.json("proc", "ls", "worker")}
    new = ctl.daemon_pid()
    assert new != old and pid_alive(new)
    assert procs[num]["running"] is True
    after = ctl.sandboxes()
    assert set(after) == set(before)
    for name, s in after.items():
        assert s["state"] == "running", s
        assert s["pid"] == before[name]["pid"] and s["id"] == before[name]["id"]
    assert ctl.ok("fs", "read", "worker", "/work/before-kill.txt").out == "still here"
    for name in after:  # every adopted sandbox answers
        assert ctl.sh(name, "echo ok").out == "ok\n", name
    n1 = len(ctl.ok("proc", "output", "worker", num).out.splitlines())
    assert wait_until(
        lambda: len(ctl.ok("proc", "output", "worker", num).out.splitlines()) > n1, 20
    ), "the background process stopped making progress"
    # its output events reach the new daemon's log too
    assert wait_until(lambda: f"proc:{num}:stdout" in ctl.ok("logs", "worker").out, 60)
    assert len(daemon_pids(home)) == 1
    ctl.ok("proc", "kill", "worker", num)


# ----------------------------------------------------------------------------- 7. pause


def test_pause_and_resume(ctl: Ctl, worker: str) -> None:
    """While paused the guest makes no progress: a counter it prints every 0.2 s stops in
    mvmd's log (checked over several CLI round trips, each many ticks long), and moves
    again after resume. No duration is measured."""
    r = ctl.ok(
        "proc", "start", "worker", "--", "sh", "-c",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done",
    )  # fmt: skip
    num = r.out.strip()
    stream = f"proc:{num}:stdout"

    def ticks() -> int:
        events = (json.loads(line) for line in ctl.ok("logs", "worker", "--json").out.splitlines())
        return sum(1 for e in events if e["stream"] == stream)

    assert wait_until(lambda: ticks() >= 2, 30), "the counter never started"
    try:
        assert ctl.ok("pause", "worker").out == "worker: paused\n"
        assert ctl.sandboxes()["worker"]["state"] == "paused"
        # output already on its way when the vCPUs stopped may still land: let it settle
        seen = [ticks()]
        assert wait_until(lambda: seen.append(ticks()) or seen[-1] == seen[-2], 30), seen
        frozen = seen[-1]
        r = ctl("exec", "worker", "--", "true")
        assert r.rc == 125 and "paused" in r.err, str(r)
        assert "mvmctl resume worker" in r.err
        r = ctl("pause", "worker")
        assert r.rc == 125 and "paused" in r.err, str(r)
        for _ in range(5):
            assert ticks() == frozen, "the guest ran while paused"
        assert ctl.ok("resume", "worker").out == "worker: running\n"
    finally:
        ctl("resume", "worker")
    assert ctl.sandboxes()["worker"]["state"] == "running"
    r = ctl("resume", "worker")
    assert r.rc == 125 and "not paused" in r.err, str(r)
    assert wait_until(lambda: ticks() > frozen, 30), "the counter did not continue after resume"
    procs = {str(p["proc"]): p for p in ctl.json("proc", "ls", "worker")}
    assert procs[num]["running"] is True
    ctl.ok("proc", "kill", "worker", num)


# ----------------------------------------------------------------------------- 8. snapshots


def test_snapshot_save_down_restore_rm(ctl: Ctl, home: Path) -> None:
    with sandbox(ctl, "snap-a", "--ttl", "20m"):
        snapshot_save_down_restore_rm(ctl, home)


def snapshot_save_down_restore_rm(ctl: Ctl, home: Path) -> None:
    data = f"snapdata-{secrets.token_hex(4)}"
    ctl.ok("fs", "write", "snap-a", "/work/snap.txt", input=data)
    r = ctl.ok(
        "proc", "start", "snap-a", "--", "sh", "-c",
        "i=0; while true; do i=$((i+1)); echo s$i; sleep 0.3; done",
    )  # fmt: skip
    num = r.out.strip()
    assert wait_until(lambda: "s2" in ctl.ok("proc", "output", "snap-a", num).out, 60)

    r = ctl.ok("snapshot", "save", "snap-a", "s1", timeout=300)
    assert r.out.startswith("snap-a/s1: "), str(r)
    snaps = ctl.json("snapshot", "ls", "snap-a")
    assert [s["name"] for s in snaps] == ["s1"] and snaps[0]["size"] > 0
    assert snaps[0]["image"] == "python-3.11"
    assert "s1" in ctl.ok("snapshot", "ls", "snap-a").out
    assert (home / "snapshots" / "snap-a" / "s1" / "state").is_file()
    assert ctl.sandboxes()["snap-a"]["state"] == "running"  # saving does not stop it

    r = ctl("snapshot", "save", "snap-a", "s1")
    assert r.rc == 125 and "already has a snapshot 's1'" in r.err, str(r)
    r = ctl("snapshot", "restore", "snap-a", "nosuch")
    assert r.rc == 125 and "no snapshot 'nosuch'" in r.err and "s1" in r.err, str(r)
    r = ctl("snapshot", "save", "snap-a", "Bad Snap")
    assert r.rc == 2 and "invalid snapshot name" in r.err, str(r)

    # in place: files written after the snapshot go away
    ctl.ok("fs", "write", "snap-a", "/work/after.txt", input="later")
    ctl.ok("snapshot", "restore", "snap-a", "s1", timeout=300)
    assert ctl("fs", "stat", "snap-a", "/work/after.txt").rc == 125
    assert ctl.ok("fs", "read", "snap-a", "/work/snap.txt").out == data

    old_id = ctl.sandboxes()["snap-a"]["id"]
    ctl.ok("down", "snap-a")
    assert "snap-a" not in ctl.sandboxes()
    assert [s["name"] for s in ctl.json("snapshot", "ls", "snap-a")] == ["s1"]  # kept

    r = ctl.ok("snapshot", "restore", "snap-a", "s1", timeout=300)
    assert "restored s1" in r.out, str(r)
    s = ctl.sandboxes()["snap-a"]
    assert s["state"] == "running" and s["id"] != old_id and pid_alive(s["pid"])
    assert ctl.ok("fs", "read", "snap-a", "/work/snap.txt").out == data
    procs = {str(p["proc"]): p for p in ctl.json("proc", "ls", "snap-a")}
    assert procs[num]["running"] is True
    n1 = len(ctl.ok("proc", "output", "snap-a", num).out.splitlines())
    assert wait_until(
        lambda: len(ctl.ok("proc", "output", "snap-a", num).out.splitlines()) > n1, 20
    ), "the restored background process does not run"
    assert ctl.ok("exec", "snap-a", "--", "echo", "restored").out == "restored\n"

    ctl.ok("snapshot", "rm", "snap-a", "s1")
    assert ctl.json("snapshot", "ls", "snap-a") == []
    assert not (home / "snapshots" / "snap-a" / "s1").exists()
    r = ctl("snapshot", "restore", "snap-a", "s1")
    assert r.rc == 125 and "no snapshot 's1'" in r.err, str(r)
    r = ctl("snapshot", "rm", "snap-a", "s1")
    assert r.rc == 125, str(r)


def test_snapshot_restore_after_down_keeps_the_sandbox_env(ctl: Ctl) -> None:
    ctl.ok("up", "--name", "envsnap", "-e", "SNAPENV=kept", "--ttl", "10m", timeout=300)
    try:
        assert ctl.sh("envsnap", 'echo "[$SNAPENV]"').out == "[kept]\n"
        ctl.ok("snapshot", "save", "envsnap", "e1", timeout=300)
        ctl.ok("down", "envsnap")
        ctl.ok("snapshot", "restore", "envsnap", "e1", timeout=300)
        assert ctl.sh("envsnap", 'echo "[$SNAPENV]"').out == "[kept]\n"
    finally:
        ctl("down", "envsnap")
        ctl("snapshot", "rm", "envsnap", "e1")


def test_concurrent_snapshot_saves_of_one_name(
    client: Client, ctl: Ctl, home: Path, worker: str
) -> None:
    outcomes: list[BaseException | M.SnapshotInfo] = []
    barrier = threading.Barrier(2)

    def save() -> None:
        with Client(autostart=False) as c:
            barrier.wait(30)
            try:
                outcomes.append(c.snapshot_save("worker", "race"))
            except errors.MvmError as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=save, daemon=True) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(200)
        assert len(outcomes) == 2
        ok = [o for o in outcomes if isinstance(o, M.SnapshotInfo)]
        bad = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(ok) == 1, outcomes
        assert isinstance(bad[0], errors.SnapshotExists), repr(bad[0])
        # the loser must not have replaced the winner's state file
        state = home / "snapshots" / "worker" / "race" / "state"
        assert state.stat().st_size == ok[0].size
    finally:
        ctl("snapshot", "rm", "worker", "race")


# ----------------------------------------------------------------------------- 10. failure


def test_killed_qemu_marks_the_sandbox_failed(ctl: Ctl, home: Path) -> None:
    with sandbox(ctl, "doomed", "--ttl", "20m"):
        killed_qemu_marks_the_sandbox_failed(ctl, home)


def killed_qemu_marks_the_sandbox_failed(ctl: Ctl, home: Path) -> None:
    s = ctl.sandboxes()["doomed"]
    pid, sid = s["pid"], s["id"]
    run_dir = home / "run" / sid
    assert run_dir.is_dir()
    assert pid in qemu_pids(home), "the pid in `ls` is not this sandbox's QEMU"
    os.kill(pid, signal.SIGKILL)

    assert wait_until(lambda: ctl.sandboxes()["doomed"]["state"] == "failed", 60), ctl.sandboxes()
    s = ctl.sandboxes()["doomed"]
    # doomed was made by this test under this mvmd: its QEMU is this mvmd's child
    assert s["reason"].startswith("QEMU killed by signal 9 (SIGKILL)"), s
    assert s["pid"] is None
    assert not run_dir.exists(), "the failed sandbox's run dir was not removed"
    assert "failed" in ctl.ok("ls").out
    r = ctl("exec", "doomed", "--", "true")
    assert r.rc == 125 and "failed" in r.err, str(r)
    assert ctl.sandboxes()["doomed"]["state"] == "failed"  # the reaper leaves it listed

    assert ctl.ok("down", "doomed").out == "doomed: removed\n"
    assert "doomed" not in ctl.sandboxes()
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- 9. TTL


@pytest.mark.timeout(600)
def test_ttl_reaper_set_ttl_and_wait(ctl: Ctl, home: Path) -> None:
    """ttl-b gets a first TTL (long enough to outlast its own boot on a loaded host) and at
    once an hour; ttl-a, made after it, gets a TTL that ends just after ttl-b's first one.
    When the reaper has removed ttl-a, a reaper pass has run after ttl-b's first TTL ended:
    ttl-b must still be running. Then a short TTL and ``wait``. No sleep: bounded polls."""
    try:
        ctl.ok("up", "--name", "ttl-b", "--ttl", f"{FIRST_TTL}s", timeout=300)
        r = ctl.ok("set-ttl", "ttl-b", "1h")  # extends it well past its first TTL
        assert "ttl-b: 3" in r.out and "s left" in r.out, str(r)
        first_expiry = ctl.sandboxes()["ttl-b"]["created"] + FIRST_TTL
        ttl_a = max(3, math.ceil(first_expiry - time.time()) + 2)  # same host clock as mvmd
        ctl.ok("up", "--name", "ttl-a", "--ttl", f"{ttl_a}s", timeout=300)
        a = ctl.sandboxes().get("ttl-a")
        if a is not None:  # (it may already be gone, if its boot outlasted its TTL)
            assert a["expires_at"] > first_expiry

        # polled on the host (no ttl-a in `ls`), through nothing that acts on TTLs
        assert wait_until(lambda: "ttl-a" not in ctl.sandboxes(), FIRST_TTL + 60), (
            "the reaper did not remove ttl-a at its TTL"
        )
        if a is not None:
            assert wait_until(lambda: not pid_alive(a["pid"]), 60)
            assert not (home / "run" / a["id"]).exists()
        boxes = ctl.sandboxes()
        assert boxes["ttl-b"]["state"] == "running" and boxes["ttl-b"]["ttl_left"] > 3000

        # `wait` starts first; the short TTL leaves it time to connect on a loaded host
        follower = ctl.popen("logs", "-f", "ttl-b")
        waiter = ctl.popen("wait", "ttl-b", "--timeout", "120s")
        try:
            ctl.ok("set-ttl", "ttl-b", f"{SHORT_TTL}s")
            out, errs = waiter.communicate(timeout=180)
            assert (waiter.returncode, out) == (0, b"ttl-b: stopped\n"), errs
            assert "ttl-b" not in ctl.sandboxes()
            # a follower of a removed sandbox's log ends
            follower.communicate(timeout=15)
            assert follower.returncode == 0
        finally:
            for p in (follower, waiter):
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        r = ctl("wait", "ttl-b", "--timeout", "5s")
        assert r.rc == 125 and "no sandbox named" in r.err, str(r)
    finally:
        ctl("down", "ttl-a")
        ctl("down", "ttl-b")


def test_wait_that_times_out_says_so(ctl: Ctl, worker: str) -> None:
    r = ctl("wait", "worker", "--timeout", "1s")
    assert (r.rc, r.out, r.err) == (124, "worker: running\n", ""), str(r)


# ----------------------------------------------------------------------------- 11. resources


def test_cpus_memory_and_disk_limits(ctl: Ctl, home: Path) -> None:
    ctl.ok(
        "up", "--name", "res", "--cpus", "2", "--memory", "256", "--disk", "32", "--ttl", "10m",
        timeout=300,
    )  # fmt: skip
    try:
        s = ctl.sandboxes()["res"]
        assert (s["cpus"], s["memory_mb"], s["disk_mb"]) == (2, 256, 32)
        r = ctl.sh("res", "nproc; grep MemTotal /proc/meminfo")
        lines = r.out.splitlines()
        assert lines[0] == "2", str(r)
        mem_kib = int(lines[1].split()[1])
        assert 128 * 1024 < mem_kib < 256 * 1024

        r = ctl.sh("res", "head -c 67108864 /dev/zero > /work/big")
        assert r.rc == 1, str(r)  # head's write failed
        assert "No space left" in r.err
        size = guest_int(ctl, "res", "stat -c %s /work/big")
        assert size <= 32 * 1024 * 1024
        # the writable layer is guest memory: nothing landed on the host's disk
        used = sum(p.stat().st_size for p in (home / "run" / s["id"]).rglob("*") if p.is_file())
        assert used < 4 * 1024 * 1024, f"{used} bytes in the run dir"
        assert ctl.ok("exec", "res", "--", "echo", "alive").out == "alive\n"
        ctl.ok("fs", "rm", "res", "/work/big")
        ctl.ok("fs", "write", "res", "/work/small", input="x" * 1000)
    finally:
        ctl("down", "res")


# ----------------------------------------------------------------------------- 12. bad input


def test_taken_and_invalid_names_are_refused(ctl: Ctl, worker: str) -> None:
    before = set(ctl.sandboxes())
    r = ctl("up", "--name", "worker")
    assert r.rc == 125 and "a sandbox named 'worker' already exists" in r.err, str(r)
    w = ctl.sandboxes()["worker"]
    assert w["state"] == "running", w  # untouched
    r = ctl("up", "--name", "Bad Name!")
    assert r.rc == 2 and "invalid sandbox name 'Bad Name!'" in r.err, str(r)
    r = ctl("up", "--name", "x" * 64)
    assert r.rc == 2 and "invalid sandbox name" in r.err, str(r)
    r = ctl("up", "--name", "ok-name", "--ttl", "0s")
    assert r.rc == 2 and "ttl" in r.err.lower(), str(r)
    r = ctl("up", "--name", "ok-name", "--image", "no-such-image")
    assert r.rc == 125 and "no-such-image" in r.err, str(r)
    assert set(ctl.sandboxes()) == before  # nothing was made


def test_racing_ups_of_one_name_make_one_sandbox(ctl: Ctl) -> None:
    procs = [ctl.popen("up", "--name", "dup", "--ttl", "5m") for _ in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 125], outs
        loser = outs[[p.returncode for p in procs].index(125)]
        assert b"already exists" in loser[1]
        assert ctl.sandboxes()["dup"]["state"] == "running"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        ctl("down", "dup")


def test_one_daemon_per_home(ctl: Ctl, home: Path, worker: str) -> None:
    first = ctl.ok("daemon", "start").out
    second = ctl.ok("daemon", "start").out
    pid = ctl.daemon_pid()
    assert f"pid {pid}" in first and f"pid {pid}" in second
    assert daemon_pids(home) == [pid]

    p = subprocess.run(
        [sys.executable, "-m", "mvm.daemon"],
        capture_output=True,
        timeout=60,
        env=ctl.env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert b"already running" in p.stderr and str(pid).encode() in p.stderr
    assert ctl.daemon_pid() == pid and daemon_pids(home) == [pid]
    assert ctl.ok("exec", "worker", "--", "true").rc == 0


def test_a_socket_owned_by_another_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a file to another uid")
    h = Path(tempfile.mkdtemp(prefix="mvmd-", dir="/tmp"))
    try:
        sock_path = h / "mvmd.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(sock_path))
        s.close()
        check_socket_owner(sock_path)  # ours: fine
        os.chown(sock_path, 65534, 65534)
        with pytest.raises(errors.HostError, match="belongs to uid 65534"):
            check_socket_owner(sock_path)
        monkeypatch.setenv("MVM_HOME", str(h))
        with pytest.raises(errors.HostError, match="belongs to uid 65534"):
            Client()
        env = {**os.environ, "MVM_HOME": str(h)}
        p = subprocess.run([*MVMCTL, "ls"], capture_output=True, timeout=60, env=env, check=False)
        assert p.returncode == 125, p.stderr
        assert b"belongs to uid 65534" in p.stderr
        assert not (h / "mvmd.lock").exists(), "a daemon was started anyway"
    finally:
        shutil.rmtree(h, ignore_errors=True)
