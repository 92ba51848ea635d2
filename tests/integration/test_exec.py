"""Running commands through the guest agent, on the shared VM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient, ExecResult
from mvm.errors import AgentError, InvalidArgument
from mvm.vm import MicroVM

#: Per test, fixture setup included: a first boot may have to make a boot template
#: (a cold boot under TCG on a loaded 2-core host).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(180), pytest.mark.usefixtures("run_dir_env")]

#: The ``call`` fixture: run a coroutine on the VM loop, bounded.
Call = Callable[..., Any]


def run(
    call: Call, agent: AgentClient, argv: list[str], timeout: float = 60, **kw: Any
) -> ExecResult:
    """``agent.exec(argv, **kw)`` on the shared VM, waiting at most ``timeout`` seconds."""
    result: ExecResult = call(agent.exec(argv, **kw), timeout=timeout)
    return result


# ----------------------------------------------------------------------------- identity


def test_default_user_is_unprivileged_in_work(call: Call, agent: AgentClient) -> None:
    r = run(call, agent, ["sh", "-c", 'id -u; id -g; id -un; pwd; echo "$USER $LOGNAME $HOME"'])
    assert r.exit_code == 0, r.stderr
    uid, gid, name, cwd, envline = r.stdout.decode().splitlines()
    assert (uid, gid, name) == ("1000", "1000", "user")
    assert cwd == "/work"
    user, logname, home = envline.split()
    assert user == logname == "user"
    assert home.startswith("/") and home != "/root"


def test_unprivileged_user_cannot_write_system_files(call: Call, agent: AgentClient) -> None:
    r = run(call, agent, ["sh", "-c", "echo x > /etc/it-not-allowed"])
    assert r.exit_code == 2  # sh: cannot create
    assert b"Permission denied" in r.stderr
    with pytest.raises(AgentError) as ei:
        call(agent.stat("/etc/it-not-allowed"))
    assert ei.value.data["code"] == P.E_NOT_FOUND
    r = run(call, agent, ["cat", "/root/.profile"])
    assert (r.exit_code, r.stdout) == (1, b"")


def test_root_on_request(call: Call, agent: AgentClient) -> None:
    r = run(call, agent, ["sh", "-c", 'id -u; echo "$HOME"'], user="root")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().split() == ["0", "/root"]


def test_unknown_user_is_a_bad_request(call: Call, agent: AgentClient) -> None:
    with pytest.raises(AgentError) as ei:
        run(call, agent, ["true"], user="no-such-user")
    assert ei.value.data["code"] == P.E_BAD_REQUEST


def test_cwd(call: Call, agent: AgentClient) -> None:
    assert run(call, agent, ["pwd"], cwd="/tmp").stdout == b"/tmp\n"
    with pytest.raises(AgentError) as ei:
        run(call, agent, ["pwd"], cwd="/no/such/dir")
    assert ei.value.data["code"] == P.E_NOT_FOUND


# ----------------------------------------------------------------------------- env, stdin


def test_env_passes_through(call: Call, agent: AgentClient) -> None:
    env = {"FOO": "bar baz", "EMPTY": "", "UNI": "h\u00e9llo \u2603", "HOME": "/tmp"}
    r = run(
        call,
        agent,
        ["python3", "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        env=env,
    )
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    for k, v in env.items():
        assert got[k] == v
    assert "/usr/bin" in got["PATH"].split(":")
    assert got["USER"] == "user"


def test_malformed_env_is_a_bad_request(call: Call, agent: AgentClient) -> None:
    with pytest.raises(AgentError) as ei:
        run(call, agent, ["true"], env={"A=B": "c"})
    assert ei.value.data["code"] == P.E_BAD_REQUEST


def test_stdin(call: Call, agent: AgentClient) -> None:
    data = b"hello\x00world\n\xff\xfe binary"
    assert run(call, agent, ["cat"], stdin=data).stdout == data
    # no stdin: the command sees EOF at once instead of hanging
    r = run(call, agent, ["cat"], timeout=20)
    assert (r.exit_code, r.stdout) == (0, b"")


def test_stdin_of_the_largest_size(call: Call, agent: AgentClient) -> None:
    data = os.urandom(P.MAX_PAYLOAD)
    r = run(call, agent, ["sha256sum"], stdin=data)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    with pytest.raises(InvalidArgument):
        run(call, agent, ["cat"], stdin=data + b"x")


# ----------------------------------------------------------------------------- exit status


def test_exit_codes(call: Call, agent: AgentClient) -> None:
    codes = [0, 1, 2, 42, 126, 255]

    async def all_codes() -> list[ExecResult]:
        return await asyncio.gather(*(agent.exec(["sh", "-c", f"exit {c}"]) for c in codes))

    results = call(all_codes())
    assert [r.exit_code for r in results] == codes
    assert all(r.signal is None and not r.timed_out for r in results)


def test_command_not_found_and_not_executable(call: Call, agent: AgentClient) -> None:
    r = run(call, agent, ["no-such-command-xyz"])
    assert r.exit_code == 127
    assert b"no-such-command-xyz" in r.stderr
    r = run(call, agent, ["/etc/hostname"])  # exists, not executable
    assert r.exit_code == 126
    r = run(call, agent, ["/work"])  # a directory
    assert r.exit_code == 126


@pytest.mark.parametrize(
    ("script", "sig"),
    [("kill -KILL $$", 9), ("kill -TERM $$", 15), ("kill -SEGV $$", 11)],
)
def test_death_by_signal(call: Call, agent: AgentClient, script: str, sig: int) -> None:
    r = run(call, agent, ["sh", "-c", script])
    assert r.signal == sig
    assert r.exit_code == 128 + sig
    assert not r.timed_out


def test_guest_side_timeout_kills_the_process_group(call: Call, agent: AgentClient) -> None:
    # a generous bound, still far under the 301.5 s sleeps: a timeout that did not fire
    # fails here (a hang check, not a duration)
    r = call(agent.exec(["sh", "-c", "sleep 301.5 & sleep 301.5; echo never"], timeout=1.5), 120)
    assert r.timed_out
    assert r.signal == 9 and r.exit_code == 137
    assert b"never" not in r.stdout
    # the background sleep of the same command went too
    check = (
        "import os\n"
        "n = 0\n"
        "for p in os.listdir('/proc'):\n"
        "    try:\n"
        "        n += open(f'/proc/{p}/cmdline', 'rb').read() == b'sleep\\x00301.5\\x00'\n"
        "    except OSError:\n"
        "        pass\n"
        "print(n)\n"
    )
    assert run(call, agent, ["python3", "-c", check], user="root").stdout == b"0\n"


# ----------------------------------------------------------------------------- output


def test_output_over_the_default_limit_is_truncated_to_exactly_16_mib(
    call: Call, agent: AgentClient
) -> None:
    r = run(call, agent, ["head", "-c", str(20 << 20), "/dev/zero"], timeout=120)
    assert r.exit_code == 0  # the command is not killed: the rest is drained and dropped
    assert len(r.stdout) == P.DEFAULT_OUTPUT_LIMIT == 16 << 20
    assert r.stdout == bytes(16 << 20)
    assert r.truncated_stdout is True
    assert r.truncated_stderr is False


def test_small_output_limit_applies_to_each_stream(call: Call, agent: AgentClient) -> None:
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    r = run(call, agent, ["sh", "-c", "seq 1 20000; seq 1 20000 >&2"], output_limit=1000)
    assert r.exit_code == 0
    assert r.stdout == expected[:1000]
    assert r.stderr == expected[:1000]
    assert r.truncated_stdout and r.truncated_stderr


def test_output_exactly_at_the_limit_is_not_truncated(call: Call, agent: AgentClient) -> None:
    r = run(call, agent, ["head", "-c", "1000", "/dev/zero"], output_limit=1000)
    assert len(r.stdout) == 1000
    assert not r.truncated_stdout
    r = run(call, agent, ["head", "-c", "1001", "/dev/zero"], output_limit=1000)
    assert len(r.stdout) == 1000
    assert r.truncated_stdout


def test_large_binary_stdout_is_byte_exact(call: Call, agent: AgentClient, gdir: str) -> None:
    script = (
        f"head -c 5000000 /dev/urandom > {gdir}/r.bin && sha256sum {gdir}/r.bin >&2 "
        f"&& cat {gdir}/r.bin"
    )
    r = run(call, agent, ["sh", "-c", script], timeout=120)
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout) == 5000000
    assert hashlib.sha256(r.stdout).hexdigest() == r.stderr.split()[0].decode()
    assert not r.truncated_stdout


def test_streaming_delivers_output_as_it_comes(call: Call, agent: AgentClient) -> None:
    """The command prints "a", then waits until the test has seen "a" (a file the test
    creates only then): output held back until the end would leave it waiting for ever,
    so the command's own bound (exit 3) or the call's bound fails the test."""
    gate = f"/tmp/it-stream-{os.urandom(4).hex()}"
    script = (
        f"echo a; i=0; while [ ! -e {gate} ]; do i=$((i+1)); "
        f"[ $i -gt 600 ] && exit 3; sleep 0.05; done; echo b; rm -f {gate}"
    )

    async def stream() -> tuple[list[P.Frame], list[bytes]]:
        frames = []
        seen: list[bytes] = []
        async for f in agent.exec_stream(["sh", "-c", script], timeout=60):
            frames.append(f)
            if f.type == P.OUT:
                seen.append(f.payload)
                if b"a" in f.payload and b"b" not in b"".join(seen):
                    assert (await agent.exec(["touch", gate])).exit_code == 0
        return frames, seen

    frames, seen = call(stream(), timeout=90)
    assert frames[0].type == P.STARTED and frames[0].header["pid"] > 1
    assert frames[-1].type == P.OK and frames[-1].header["exit_code"] == 0
    assert b"".join(seen) == b"a\nb\n"


def test_on_output_callback_sees_every_byte_in_order(call: Call, agent: AgentClient) -> None:
    chunks: list[tuple[str, bytes]] = []
    r = run(
        call,
        agent,
        ["sh", "-c", "seq 1 50000; echo done >&2"],
        on_output=lambda stream, data: chunks.append((stream, data)),
    )
    assert b"".join(d for s, d in chunks if s == "stdout") == r.stdout
    assert b"".join(d for s, d in chunks if s == "stderr") == r.stderr == b"done\n"
    assert r.stdout.endswith(b"\n50000\n")


def test_concurrent_execs_do_not_mix_output(call: Call, agent: AgentClient) -> None:
    """Ten commands meet at a barrier (each marks itself, then waits for all ten marks)
    before printing: run one after another, the first would never see the others and
    exits 99, so the test proves they ran at once without timing them."""
    n = 10
    barrier = f"/tmp/it-barrier-{os.urandom(4).hex()}"
    script = (
        f"mkdir -p {barrier}; touch {barrier}/$T; w=0; "
        f'while [ "$(ls {barrier} | wc -l)" -lt {n} ]; do w=$((w+1)); '
        "[ $w -gt 1200 ] && exit 99; sleep 0.05; done; "
        'i=0; while [ $i -lt 300 ]; do echo "task-$T-$i"; i=$((i+1)); done; '
        'echo "err-$T" >&2; exit $T'
    )

    async def many() -> list[ExecResult]:
        return await asyncio.gather(
            *(agent.exec(["sh", "-c", script], env={"T": str(t)}) for t in range(n))
        )

    results = call(many(), timeout=120)
    for t, r in enumerate(results):
        assert r.exit_code == t, (t, r.exit_code, r.stderr)
        assert r.stdout == "".join(f"task-{t}-{i}\n" for i in range(300)).encode()
        assert r.stderr == f"err-{t}\n".encode()
    run(call, agent, ["rm", "-rf", barrier])


def test_lingering_background_child_does_not_steal_later_output(
    call: Call, boot_vm: Callable[..., MicroVM]
) -> None:
    """A command that leaves a child behind holding its pipes: the child ends with the
    command (its group is killed), so nothing of it can write into a later command's
    output. No sleeps as synchronisation: A exits only once its child has said it runs."""
    agent = boot_vm().require_agent()  # its own VM: the stale pump must not disturb others
    tag = os.urandom(4).hex()
    pidfile, go = f"/tmp/it-child-{tag}", f"/tmp/it-go-{tag}"
    # the child writes into A's pipes only once B runs (B makes the file ``go``)
    child = (
        f"echo $$ > {pidfile}; while [ ! -e {go} ]; do sleep 0.05; done; "
        "while true; do echo late; echo late >&2; sleep 0.05; done"
    )
    a = run(
        call,
        agent,
        [
            "sh",
            "-c",
            f"sh -c '{child}' & i=0; while [ ! -s {pidfile} ]; do i=$((i+1)); "
            "[ $i -gt 1200 ] && exit 3; sleep 0.05; done; echo done",
        ],
    )
    assert (a.exit_code, a.stdout) == (0, b"done\n")
    pid = run(call, agent, ["cat", pidfile]).stdout.decode().strip()
    assert pid.isdigit(), pid
    # dead: gone, or a zombie not reaped yet (bounded: the agent answers before the killed
    # child is reaped)
    probe = ["sh", "-c", "i=0; while :; do "
             f"st=$(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null); "
             '[ -z "$st" ] || [ "$st" = Z ] && exit 0; '
             "i=$((i+1)); [ $i -gt 1200 ] && exit 1; sleep 0.05; done"]  # fmt: skip
    assert run(call, agent, probe, user="root").exit_code == 0, f"A's child {pid} outlived A"
    # B: a line every step on both streams, nothing of A's child among them
    b = run(
        call,
        agent,
        [
            "sh",
            "-c",
            f"touch {go}; i=1; while [ $i -le 20 ]; do echo l$i; echo l$i >&2; i=$((i+1)); done",
        ],
    )
    assert b.exit_code == 0
    expected = "".join(f"l{i}\n" for i in range(1, 21)).encode()
    assert (b.stdout, b.stderr) == (expected, expected)


def test_cancelled_exec_stops_the_guest_command(
    call: Call, boot_vm: Callable[..., MicroVM]
) -> None:
    agent = boot_vm().require_agent()  # its own VM: a leaked command must not linger in others

    async def scenario() -> bytes:
        task = asyncio.create_task(
            agent.exec(["sh", "-c", "echo $$ > /tmp/it-pid; exec sleep 1000"])
        )
        pid = b""
        for _ in range(100):
            r = await agent.exec(["cat", "/tmp/it-pid"])
            pid = r.stdout.strip()
            if pid:
                break
            await asyncio.sleep(0.1)
        assert pid, "the command never started"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        probe = ["sh", "-c", f"kill -0 {pid.decode()} 2>/dev/null && echo alive || echo gone"]
        out = b""
        deadline = time.monotonic() + 60  # a generous bound for the guest to stop it
        while time.monotonic() < deadline:
            out = (await agent.exec(probe, user="root")).stdout
            if out == b"gone\n":
                break
            await asyncio.sleep(0.1)
        return out

    assert call(scenario(), timeout=120) == b"gone\n"
