"""Abuse of a real VM: protocol garbage, a killed agent, a killed QEMU.

These tests break their VM (or could), so each uses a dedicated one.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.errors import AgentError, CommandTimeout, MvmError, VMDied
from mvm.vm import MicroVM

#: Per test, fixture setup included: a first boot may have to make a boot template
#: (a cold boot under TCG on a loaded 2-core host).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(180), pytest.mark.usefixtures("run_dir_env")]

#: The ``call`` fixture: run a coroutine on the VM loop, bounded.
Call = Callable[..., Any]
BootVM = Callable[..., MicroVM]


def _noise(n: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(n)
    return data.replace(b"MVM", b"mvm")  # no accidental magic: pure garbage


GARBAGE = {
    "random bytes": _noise(64 * 1024, 1),
    "zeros": bytes(4096),
    "oversized length prefix": P.MAGIC + struct.pack(">II", 0xFFFFFFFF, 16) + _noise(100, 2),
    "header longer than body": P.MAGIC + struct.pack(">II", 8, 1000) + b"{}" * 4,
    "invalid JSON header": P.MAGIC + struct.pack(">II", 4 + 10, 10) + b"{not json}",
    "header not an object": P.MAGIC + struct.pack(">II", 4 + 5, 5) + b"[1,2]",
    "header without type": P.MAGIC + struct.pack(">II", 4 + 8, 8) + b'{"id":1}',
    "non-UTF-8 header": P.MAGIC + struct.pack(">II", 4 + 4, 4) + b"\xff\xfe\xfd\xfc",
    "negative id": P.encode({"t": "ping", "id": -5}),
    "truncated magic": b"MVM",
    "magic then noise": P.MAGIC + b"\x00\x00",
}


@pytest.fixture(scope="module")
def rogue(start_vm: BootVM, loop_thread: Any) -> Iterator[MicroVM]:
    """A VM that only the garbage tests talk to (module-scoped: garbage must not break it)."""
    vm = start_vm()
    try:
        yield vm
    finally:
        loop_thread.call(vm.destroy(), timeout=30)
    assert not vm.run_dir.exists()


async def _send_raw_then_check(agent: AgentClient, raw: bytes) -> dict[str, Any]:
    agent._writer.write(raw)
    await agent._writer.drain()
    info = await agent.hello(30)  # repeats until the agent answers the newest nonce
    await agent.ping(10)
    r = await agent.exec(["echo", "alive"], timeout=20)
    assert (r.exit_code, r.stdout) == (0, b"alive\n")
    return info


@pytest.mark.parametrize("name", list(GARBAGE))
def test_agent_survives_garbage(call: Call, rogue: MicroVM, name: str) -> None:
    agent = rogue.require_agent()
    info = call(_send_raw_then_check(agent, GARBAGE[name]), timeout=90)
    assert info["version"] == P.PROTOCOL_VERSION
    assert agent.failure is None  # the guest never answered with anything malformed
    assert rogue.qemu.alive()


def test_agent_survives_garbage_glued_to_a_request(call: Call, rogue: MicroVM) -> None:
    """Garbage immediately followed by a real frame, in one write: the request is found."""
    agent = rogue.require_agent()

    async def scenario() -> None:
        await _send_raw_then_check(agent, _noise(1000, 3) + P.encode({"t": "ping", "id": 10**6}))
        await _send_raw_then_check(agent, b"".join(GARBAGE.values()))

    call(scenario(), timeout=90)
    assert agent.failure is None


def test_malformed_requests_get_error_replies(call: Call, rogue: MicroVM) -> None:
    agent = rogue.require_agent()

    def code(type_: str, header: dict[str, Any]) -> str:
        with pytest.raises(AgentError) as ei:
            call(agent.call(type_, header, timeout=20))
        return str(ei.value.data["code"])

    assert code("no.such.request", {}) == P.E_BAD_REQUEST
    assert code(P.EXEC, {"argv": "not a list"}) == P.E_BAD_REQUEST
    assert code(P.EXEC, {"argv": []}) == P.E_BAD_REQUEST
    assert code(P.EXEC, {"argv": ["true"], "timeout": -1}) == P.E_BAD_REQUEST
    assert code(P.EXEC, {"argv": ["true"], "env": ["x"]}) == P.E_BAD_REQUEST
    assert code(P.FS_READ, {"path": "/etc/passwd", "offset": "zero"}) == P.E_BAD_REQUEST
    assert code(P.FS_READ, {"path": "/etc/\x00passwd"}) == P.E_BAD_REQUEST
    assert code(P.FS_READ, {}) == P.E_BAD_REQUEST
    assert code(P.FS_WRITE, {"path": "/tmp/x", "mode": 0o170000}) == P.E_BAD_REQUEST
    assert code(P.SIGNAL, {"ref": 999999}) == P.E_UNKNOWN_REF
    call(agent.ping())
    assert agent.failure is None


def test_guest_code_cannot_open_the_agent_port(call: Call, rogue: MicroVM) -> None:
    """Even root in the guest cannot talk to the host in the agent's name."""
    agent = rogue.require_agent()
    script = (
        "for d in /sys/class/virtio-ports/*; do "
        '[ "$(cat $d/name)" = org.mvm.agent ] && port=/dev/$(basename $d); done; '
        'echo "$port"; printf "MVM1garbage" > "$port" && echo WROTE'
    )
    r = call(agent.exec(["sh", "-c", script], user="root", timeout=20))
    assert r.stdout.startswith(b"/dev/vport")
    assert b"WROTE" not in r.stdout
    assert b"busy" in r.stderr.lower()
    call(agent.ping())
    assert agent.failure is None


def test_killed_agent_is_restarted(call: Call, boot_vm: BootVM) -> None:
    """Root kills the agent serving it: the request in flight is lost (bounded by its
    timeout), PID 1 restarts the agent, and a new handshake brings the VM back."""
    vm = boot_vm()
    agent = vm.require_agent()
    with pytest.raises(CommandTimeout):
        call(
            agent.exec(["sh", "-c", "kill -KILL $PPID; sleep 5"], user="root", timeout=1),
            timeout=30,
        )
    call(agent.hello(30), timeout=40)
    r = call(agent.exec(["echo", "back"], timeout=20))
    assert (r.exit_code, r.stdout) == (0, b"back\n")
    assert vm.qemu.alive()


def test_killing_qemu_fails_the_running_command_promptly(call: Call, boot_vm: BootVM) -> None:
    vm = boot_vm()
    agent = vm.require_agent()

    async def scenario() -> BaseException | None:
        task = asyncio.create_task(
            agent.exec(["sh", "-c", "touch /tmp/it-started; exec sleep 3600"])
        )
        for _ in range(300):  # bounded: until the command has started
            probe = await agent.exec(["sh", "-c", "test -e /tmp/it-started && echo yes"])
            if probe.stdout == b"yes\n":
                break
            await asyncio.sleep(0.1)
        assert not task.done()
        assert vm.qemu.proc is not None
        vm.qemu.proc.kill()
        try:
            # a generous bound, far inside the command's hour: a client that waited for
            # the command instead of noticing QEMU's death fails here
            await asyncio.wait_for(task, 100)
        except (MvmError, TimeoutError) as exc:
            return exc
        return None

    exc = call(scenario(), timeout=150)
    assert isinstance(exc, VMDied), f"expected VMDied, got {exc!r}"
    # later requests fail at once too, and the VM says it is dead
    with pytest.raises(VMDied):
        call(agent.ping(), timeout=10)
    with pytest.raises(VMDied):
        vm.require_agent()
    run_dir = vm.run_dir
    call(vm.destroy(), timeout=30)
    assert not vm.qemu.alive()
    assert not run_dir.exists()
    call(vm.destroy(), timeout=30)  # idempotent
