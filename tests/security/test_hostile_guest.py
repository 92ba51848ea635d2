"""THE HOSTILE GUEST: a real VM whose agent is an attacker's program (root, PID 1).

The VM boots the real kernel, image and /init with ``hostile_agent.py`` in place of the
agent; it answers honestly until a request tells it which attack to make. Each attack
must end in a clear host-side error (AgentProtocolError, CommandTimeout) within a bound,
with the host process's memory bounded and a normal VM beside it still answering.

One hostile VM serves the attacks that leave the channel clean (after each, the host
reconnects and handshakes again); the two that leave bytes in flight (a trickled frame,
an endless stream) get their own VM.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm.agent.client import AgentClient
from mvm.errors import AgentProtocolError, CommandTimeout, VMBootTimeout
from mvm.images.store import Image
from mvm.vm import MicroVM
from tests.integration.conftest import (
    BOOT_WAIT,
    LoopThread,
    _run_dir_env,
    sandbox_dirs,
    wait_no_qemu,
)
from tests.security.hostile import boot_hostile, build_hostile_initramfs, rss_bytes

pytestmark = [pytest.mark.timeout(240)]

Call = Callable[..., Any]
#: Growth of this (host) process's RSS allowed while a guest floods it.
RSS_BOUND = 64 * 1024 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def hostile_initrd(image: Image, run_root: Path) -> Path:
    return build_hostile_initramfs(image, run_root / "hostile")


@pytest.fixture(scope="module")
def boot_hostile_vm(
    image: Image, hostile_initrd: Path, loop_thread: LoopThread, run_root: Path
) -> Iterator[Callable[..., MicroVM]]:
    vms: list[MicroVM] = []

    def boot(mode: str = "menu") -> MicroVM:
        with _run_dir_env(run_root):
            vm: MicroVM = loop_thread.call(
                boot_hostile(image, hostile_initrd, mode=mode), timeout=BOOT_WAIT
            )
        vms.append(vm)
        return vm

    yield boot
    for vm in vms:
        loop_thread.call(vm.destroy(), timeout=30)
        assert not vm.qemu.alive()
        assert not vm.run_dir.exists()


@pytest.fixture(scope="module")
def hostile(boot_hostile_vm: Callable[..., MicroVM]) -> MicroVM:
    """The hostile VM shared by the attacks that leave its channel clean."""
    return boot_hostile_vm()


async def reconnect(vm: MicroVM) -> AgentClient:
    """Drop the VM's agent connection and handshake on a new one (as mvmd would)."""
    if vm.agent is not None:
        await vm.agent.close()
    vm.agent = await AgentClient.connect(vm.qemu.cfg.agent_socket)
    await vm.agent.hello(30, alive=vm.qemu.alive)
    return vm.agent


async def neighbour_answers(vm: MicroVM) -> None:
    r = await vm.require_agent().exec(["echo", "neighbour"], timeout=60)
    assert (r.exit_code, r.stdout) == (0, b"neighbour\n")


async def attack_beside(
    hostile: MicroVM, normal: MicroVM, attack: Any
) -> tuple[BaseException | None, Any]:
    """Run ``attack`` (a coroutine) on a fresh connection to the hostile VM while the
    normal VM runs a command; return the attack's exception (or None) and result."""
    await reconnect(hostile)
    results = await asyncio.gather(
        attack(hostile.require_agent()), neighbour_answers(normal), return_exceptions=True
    )
    err, neighbour = results
    if isinstance(neighbour, BaseException):
        raise neighbour
    return (err if isinstance(err, BaseException) else None), err


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("oversize", "exceeds"),
        ("badjson", "not valid JSON"),
        ("badid", "non-negative integer"),
    ],
)
def test_broken_framing_fails_the_connection_clearly(
    call: Call, hostile: MicroVM, shared_vm: MicroVM, mode: str, says: str
) -> None:
    async def attack(agent: AgentClient) -> None:
        await agent.exec(["attack", mode], timeout=20)

    err, _ = call(attack_beside(hostile, shared_vm, attack), timeout=90)
    assert isinstance(err, AgentProtocolError), repr(err)  # not a wait for a 4 GiB frame
    assert says in str(err)
    agent = hostile.require_agent()
    assert isinstance(agent.failure, AgentProtocolError)  # what the reaper marks failed on
    with pytest.raises(AgentProtocolError):  # every later call fails at once, too
        call(agent.ping(), timeout=10)
    assert hostile.qemu.alive()
    call(reconnect(hostile), timeout=60)  # the guest cannot wedge the host's side


def test_replies_nobody_asked_for_are_dropped_and_memory_stays_bounded(
    call: Call, hostile: MicroVM, shared_vm: MicroVM
) -> None:
    """Hundreds of MiB of replies to ids never used, fake ready/hello frames and bad
    events: dropped and counted, the honest reply still arrives."""
    count = 96  # MiB of OUT junk (and as many of junk events)
    before: dict[str, int] = {}

    async def attack(agent: AgentClient) -> Any:
        before["dropped"] = agent.dropped_frames
        before["rss"] = rss_bytes()
        return await agent.exec(["attack", "unasked", str(count)], timeout=180)

    err, result = call(attack_beside(hostile, shared_vm, attack), timeout=200)
    assert err is None, repr(err)
    assert result.exit_code == 0 and result.stdout == b""
    agent = hostile.require_agent()
    assert agent.dropped_frames - before["dropped"] >= 3 * count
    assert agent.failure is None
    growth = rss_bytes() - before["rss"]
    assert growth < RSS_BOUND, (
        f"RSS grew by {growth / MIB:.1f} MiB while the guest sent {2 * count} MiB"
    )
    call(agent.ping(), timeout=10)


@pytest.mark.parametrize("name", ["dotdot", "nul", "slash", "dot", "long"])
def test_poisoned_file_names_are_refused(
    call: Call, hostile: MicroVM, shared_vm: MicroVM, name: str
) -> None:
    """fs.list entries named ``../..``, ``..``, with NULs or slashes, or 5000 bytes long
    (no Linux directory can hold them): the reply is refused, the connection stays usable."""

    async def attack(agent: AgentClient) -> None:
        await agent.list_dir(f"/attack/{name}")

    err, _ = call(attack_beside(hostile, shared_vm, attack), timeout=90)
    assert isinstance(err, AgentProtocolError), repr(err)
    assert "fs.list" in str(err)
    call(hostile.require_agent().ping(), timeout=10)


def test_odd_but_possible_names_are_data(call: Call, hostile: MicroVM) -> None:
    """Terminal escapes are legal in a Linux file name: passed on as data (the CLI
    escapes what it prints), not refused."""

    async def listing() -> list[Any]:
        return await (await reconnect(hostile)).list_dir("/attack/escape")

    entries = call(listing(), timeout=60)
    assert [e.name for e in entries] == ["\x1b]0;pwned\x07\x1b[2J"]


def test_replies_of_the_wrong_shape_are_refused(
    call: Call, hostile: MicroVM, shared_vm: MicroVM
) -> None:
    async def attack(agent: AgentClient) -> None:
        await agent.exec(["attack", "wrongtype"], timeout=20)

    err, _ = call(attack_beside(hostile, shared_vm, attack), timeout=90)
    assert isinstance(err, AgentProtocolError), repr(err)
    assert "malformed reply" in str(err)


def test_fake_ready_and_wrong_nonce_never_complete_a_handshake(
    call: Call, hostile: MicroVM, shared_vm: MicroVM
) -> None:
    """A guest answering every hello with a wrong nonce (and fake ``ready`` frames) makes
    the handshake time out: the host never takes a stale or forged answer for a live one."""

    async def attack(agent: AgentClient) -> None:
        await agent.exec(["attack", "nonce"], timeout=20)
        await agent.hello(4.0)

    err, _ = call(attack_beside(hostile, shared_vm, attack), timeout=90)
    assert isinstance(err, CommandTimeout), repr(err)
    agent = hostile.require_agent()
    assert agent.failure is None
    call(agent.call("ping", {"reset": True}), timeout=10)
    call(agent.hello(30), timeout=40)  # honest again: the handshake completes


def test_a_guest_that_never_answers_the_right_nonce_fails_its_boot(
    image: Image, hostile_initrd: Path, loop_thread: LoopThread, run_root: Path
) -> None:
    """At boot (``mvm.hostile=nonce``: fake ``ready`` frames, every hello answered with a
    wrong nonce) the VM is never taken for booted: VMBootTimeout, and nothing is left."""
    before = set(sandbox_dirs(run_root))
    with _run_dir_env(run_root), pytest.raises(VMBootTimeout) as ei:
        loop_thread.call(
            boot_hostile(image, hostile_initrd, mode="nonce", boot_timeout=30), timeout=BOOT_WAIT
        )
    assert "did not answer" in ei.value.message
    left = set(sandbox_dirs(run_root)) - before
    assert left == set(), f"the failed boot left {left}"
    assert wait_no_qemu("mvm.hostile=nonce") == [], "its QEMU is still running"


def test_a_frame_trickled_byte_by_byte_times_out(
    call: Call, boot_hostile_vm: Callable[..., MicroVM], shared_vm: MicroVM
) -> None:
    """Slowloris: the reply arrives one byte per second; the call ends at its deadline."""
    vm = boot_hostile_vm()

    async def attack(agent: AgentClient) -> None:
        await agent.exec(["attack", "slowloris"], timeout=3)

    err, _ = call(attack_beside(vm, shared_vm, attack), timeout=90)
    # a client that waited for the whole trickle would get the (late) OK, not a timeout
    assert isinstance(err, CommandTimeout), repr(err)
    call(neighbour_answers(shared_vm), timeout=60)


def test_an_endless_output_stream_is_capped_and_bounded(
    call: Call, boot_hostile_vm: Callable[..., MicroVM], shared_vm: MicroVM
) -> None:
    """An exec whose output never ends: the host keeps at most ``output_limit``, its
    memory stays bounded while the guest pushes as fast as it can, and the call ends
    at the command's deadline."""
    vm = boot_hostile_vm()
    limit = 4 * MIB
    got = {"bytes": 0}
    before: dict[str, int] = {}

    def on_output(stream: str, data: bytes) -> None:
        got["bytes"] += len(data)

    async def attack(agent: AgentClient) -> None:
        before["rss"] = rss_bytes()
        await agent.exec(["attack", "endless"], timeout=20, output_limit=limit, on_output=on_output)

    err, _ = call(attack_beside(vm, shared_vm, attack), timeout=120)
    assert isinstance(err, CommandTimeout), repr(err)
    assert got["bytes"] == limit
    growth = rss_bytes() - before["rss"]
    console = vm.qemu.console_tail(100_000)
    sent = [int(n) for n in re.findall(r"endless: sent (\d+) MiB", console)]
    print(
        f"endless stream: guest sent >= {max(sent, default=0)} MiB; RSS growth {growth / MIB:.1f} MiB"
    )
    assert sent and max(sent) >= 128, f"the guest sent too little to prove anything: {sent}"
    assert growth < RSS_BOUND, f"RSS grew by {growth / MIB:.1f} MiB"
