"""Issue 11.2 and 11.4 against real VMs: what an exec starts ends with it (cgroup v2 in the
guest), a fork bomb neither outlives its exec nor silences the agent, and large commands
either work or fail with one clear error naming the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient, ExecResult
from mvm.errors import AgentError, InvalidArgument
from mvm.vm import MicroVM

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("run_dir_env")]

Call = Callable[..., Any]

#: Counts live (not zombie) processes whose command line starts with argv[1] (a regex).
COUNTER = r"""
import os, re, sys
n = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    n += bool(re.match(sys.argv[1], cmd))
print(n)
"""


def count_cmdlines(pattern: str) -> list[str]:
    """A command printing how many live processes have a command line matching ``pattern``."""
    return ["python3", "-c", COUNTER, pattern]


#: Live processes of a bash fork bomb (none but a bomb's run bash in this image).
COUNT_BASH = count_cmdlines("bash ")


async def poll_count(agent: AgentClient, argv: list[str], want: int, timeout: float) -> int:
    """Run ``argv`` until it prints ``want`` (bounded); return the last count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = await agent.exec(argv, user="root", timeout=120)
        n = int(r.stdout.strip() or b"-1")
        if n == want or loop.time() > deadline:
            return n
        await asyncio.sleep(0.5)


async def bombing(agent: AgentClient, at_least: int, timeout: float) -> int:
    """Wait (bounded) until the commands' cgroup holds ``at_least`` tasks; return the count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    n = 0
    while loop.time() < deadline:
        try:
            raw = await agent.read_file("/sys/fs/cgroup/mvm-work/pids.current")
            n = int(raw.strip() or b"0")
        except AgentError:
            n = 0
        if n >= at_least:
            break
        await asyncio.sleep(0.5)
    return n


def test_the_guest_runs_commands_in_cgroups(boot_vm: Callable[..., MicroVM]) -> None:
    agent = boot_vm().require_agent()
    assert str(agent.info.get("cgroup", "")).startswith("v2 "), agent.info


def test_a_fork_bomb_ends_with_its_exec_and_the_agent_answers_during_it(
    call: Call, boot_vm: Callable[..., MicroVM]
) -> None:
    agent = boot_vm().require_agent()

    async def scenario() -> tuple[int, int, ExecResult, int, ExecResult]:
        bomb = asyncio.create_task(
            agent.exec(["bash", "-c", ":(){ :|:& };:; sleep 600"], timeout=60)
        )
        peak = await bombing(agent, 150, timeout=50)
        pings = 0
        for _ in range(3):  # each bounded; CommandTimeout fails the test
            await agent.ping(timeout=30)
            pings += 1
        result = await bomb
        left = await poll_count(agent, COUNT_BASH, 0, timeout=30)
        after = await agent.exec(["echo", "ok"], timeout=60)
        return peak, pings, result, left, after

    peak, pings, result, left, after = call(scenario(), timeout=400)
    assert peak >= 150, f"the bomb never got going ({peak} tasks)"
    assert pings == 3
    assert result.timed_out
    assert left == 0, f"{left} bash processes outlived the exec"
    assert (after.exit_code, after.stdout) == (0, b"ok\n")


def test_the_issue_fork_bomb_is_gone_when_its_exec_returns(
    call: Call, boot_vm: Callable[..., MicroVM]
) -> None:
    """As reported: the shell returns at once and leaves the bomb running."""
    agent = boot_vm().require_agent()

    async def scenario() -> tuple[ExecResult, int, ExecResult]:
        result = await agent.exec(["bash", "-c", ":(){ :|:& };:"], timeout=20)
        left = await poll_count(agent, COUNT_BASH, 0, timeout=30)
        after = await agent.exec(["echo", "ok"], timeout=60)
        return result, left, after

    result, left, after = call(scenario(), timeout=300)
    assert left == 0, f"{left} bash processes outlived the exec ({result})"
    assert (after.exit_code, after.stdout) == (0, b"ok\n")


def test_leftovers_die_with_the_exec_unless_detached_or_started_as_a_process(
    call: Call, boot_vm: Callable[..., MicroVM]
) -> None:
    agent = boot_vm().require_agent()

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        r = await agent.exec(["sh", "-c", "sleep 1001 & echo started"], timeout=60)
        out["plain"] = (r.stdout, await poll_count(agent, count_cmdlines("sleep 1001"), 0, 10))
        r = await agent.exec(["sh", "-c", "sleep 1002 & echo started"], timeout=60, detach=True)
        out["detached"] = (r.stdout, await poll_count(agent, count_cmdlines("sleep 1002"), 1, 0))
        proc = await agent.proc_start(["sh", "-c", "sleep 1003 & sleep 1004"])
        await poll_count(agent, count_cmdlines("sleep 1003"), 1, 30)
        await agent.exec(["true"], timeout=60)  # an exec ending kills nothing of the process
        out["proc"] = (
            await poll_count(agent, count_cmdlines("sleep 100[34]"), 2, 0),
            (await agent.proc_wait(proc.proc, 0)).running,
        )
        await agent.proc_signal(proc.proc, 9)  # kill: the whole group, its child too
        out["killed"] = await poll_count(agent, count_cmdlines("sleep 100[34]"), 0, 30)
        cg = await agent.exec(["cat", "/proc/self/cgroup"], timeout=60)
        out["cgroup"] = cg.stdout
        return out

    out = call(scenario(), timeout=400)
    assert out["plain"] == (b"started\n", 0)
    assert out["detached"] == (b"started\n", 1)
    assert out["proc"] == (2, True)
    assert out["killed"] == 0
    assert out["cgroup"].startswith(b"0::/mvm-work/exec-"), out["cgroup"]


def test_limits_are_configurable_per_sandbox(call: Call, boot_vm: Callable[..., MicroVM]) -> None:
    agent = boot_vm().require_agent()
    read = [
        "sh",
        "-c",
        'd=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat "$d/pids.max" "$d/memory.max"',
    ]
    # "v2 pids.max=1024 memory.max=100% of <budget>": the commands' memory budget in bytes
    budget = int(str(agent.info["cgroup"]).rsplit(" ", 1)[1])

    async def scenario() -> tuple[bytes, bytes, ExecResult, str]:
        before = (await agent.exec(read, timeout=60)).stdout
        agent.set_limits(pids_max=40, memory_pct=50)
        await agent.hello(60)
        after = (await agent.exec(read, timeout=60)).stdout
        many = await agent.exec(
            ["sh", "-c", "for i in $(seq 80); do sleep 30 & done 2>/dev/null"], timeout=120
        )
        return before, after, many, str(agent.info["cgroup"])

    before, after, many, described = call(scenario(), timeout=400)
    pids, memory = before.split()
    assert pids == b"1024" and budget - 4096 < int(memory) <= budget, (before, budget)
    pids, memory = after.split()
    assert pids == b"40" and budget // 2 - 4096 < int(memory) <= budget // 2, (after, budget)
    assert described.startswith("v2 pids.max=40 memory.max=50% of "), described
    assert not many.timed_out  # forks past the limit failed, and what ran ended with the exec


def test_a_large_argument_works_and_a_too_large_one_is_refused_clearly(
    call: Call, boot_vm: Callable[..., MicroVM]
) -> None:
    agent = boot_vm().require_agent()
    big = "a" * 100_000

    async def scenario() -> tuple[ExecResult, bytes, list[str]]:
        r = await agent.exec(["echo", big], timeout=60, env={"BIG": "b" * 60_000})
        proc = await agent.proc_start(["sh", "-c", 'printf %s "$1" | wc -c', "sh", big])
        done = await agent.proc_wait(proc.proc, 60)
        assert done.exit_code == 0
        out, _ = await agent.proc_output(proc.proc, "stdout", 0)
        errors = []
        for argv in (["echo", "a" * P.MAX_ARG + "a"], ["echo", *[big] * 6]):
            try:
                await agent.exec(argv, timeout=60)
            except InvalidArgument as exc:
                errors.append(exc.message)
        return r, out, errors

    r, out, errors = call(scenario(), timeout=300)
    assert (r.exit_code, r.stdout) == (0, big.encode() + b"\n")
    assert out.strip() == b"100000"
    assert len(errors) == 2
    assert str(P.MAX_ARG) in errors[0]
    assert "512 KiB" in errors[1]
