"""Probes from root inside a real guest: host files, host ports, other sandboxes, the
host's disk and memory. Each must fail to escape, and the sandbox must keep answering.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm import paths
from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.errors import AgentError
from mvm.images.store import Image
from mvm.vm import MicroVM
from tests.integration.conftest import LoopThread
from tests.security.probes import search_everywhere, split_marker

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("run_dir_env")]

Call = Callable[..., Any]
MIB = 1024 * 1024


def root_sh(call: Call, agent: AgentClient, script: str, timeout: float = 120) -> Any:
    return call(
        agent.exec(["sh", "-c", script], user="root", timeout=timeout), timeout=timeout + 30
    )


@pytest.fixture(scope="module")
def second_vm(start_vm: Callable[..., MicroVM], loop_thread: LoopThread) -> Iterator[MicroVM]:
    """Another sandbox of the same shape (a clone of the same boot template)."""
    vm = start_vm()
    try:
        yield vm
    finally:
        loop_thread.call(vm.destroy(), timeout=30)


# ----------------------------------------------------------------------------- host files


def test_a_host_file_not_included_is_nowhere_in_the_guest(
    call: Call, agent: AgentClient, image: Image, tmp_path: Path
) -> None:
    marker = "mvmhostmarker" + secrets.token_hex(16)
    host_file = tmp_path / "host-secret.txt"
    host_file.write_text(marker + "\n")
    r = root_sh(call, agent, search_everywhere(split_marker(marker)), timeout=180)
    assert r.exit_code == 0, r.stderr
    out = r.stdout.decode()
    assert out.strip().endswith("found=0"), out
    assert out.split()[:-1] == ["vda"], f"unexpected block devices: {out}"
    # The only disk is the read-only image: same size as the rootfs file, and root
    # cannot write to it.
    r = root_sh(
        call,
        agent,
        "cat /sys/block/vda/ro; echo $(( $(cat /sys/block/vda/size) * 512 )); "
        "dd if=/dev/zero of=/dev/vda bs=512 count=1 2>&1; echo rc=$?",
    )
    ro, size, *rest = r.stdout.decode().split("\n", 2)
    assert ro == "1"
    assert int(size) == os.path.getsize(image.rootfs)
    assert "rc=0" not in rest[0], rest


def test_the_search_would_have_found_a_file_that_was_copied_in(
    call: Call, agent: AgentClient
) -> None:
    """The probe above is not blind: the same search finds a marker put in on purpose."""
    marker = "mvmcopiedmarker" + secrets.token_hex(16)
    call(agent.write_file("/tmp/copied-in.txt", marker.encode()))
    try:
        r = root_sh(call, agent, search_everywhere(split_marker(marker)), timeout=180)
        out = r.stdout.decode()
        assert "/tmp/copied-in.txt" in out and out.strip().endswith("found=1"), out
    finally:
        call(agent.remove("/tmp/copied-in.txt"))


# ----------------------------------------------------------------------------- host ports


def host_listening_ports() -> set[int]:
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def tcp_inodes() -> set[str]:
    out = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        out.update(line.split()[9] for line in lines)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_guest_listener_opens_nothing_on_the_host(
    call: Call, agent: AgentClient, shared_vm: MicroVM
) -> None:
    port = free_port()
    before = host_listening_ports()
    assert port not in before
    listener = (
        "import socket,time\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('0.0.0.0', {port})); s.listen(); print('listening', flush=True); time.sleep(60)\n"
    )
    proc = call(agent.proc_start(["python3", "-c", listener], user="root"))
    try:
        r = root_sh(
            call,
            agent,
            f"for i in $(seq 100); do grep -qi ':{port:04X} 00000000:0000 0A' /proc/net/tcp "
            "&& break; sleep 0.1; done; cat /proc/net/tcp; ls /sys/class/net",
        )
        assert f":{port:04X} 00000000:0000 0A".lower() in r.stdout.decode().lower(), r.stdout
        assert r.stdout.decode().split()[-1] == "lo", "the guest has a network device"
        after = host_listening_ports()
        assert port not in after
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
        # QEMU itself holds no TCP/UDP socket at all (only Unix sockets).
        assert shared_vm.qemu.proc is not None
        assert socket_inodes(shared_vm.qemu.proc.pid) & tcp_inodes() == set()
    finally:
        call(agent.proc_signal(proc.proc, 9))


# ----------------------------------------------------------------------------- sandboxes


def test_another_sandbox_sees_none_of_my_files(
    call: Call, agent: AgentClient, second_vm: MicroVM
) -> None:
    """A and B are clones of one boot template (one RAM file, copy-on-write): what A
    writes, B cannot see, by path or by content anywhere in its filesystem or disks."""
    other = second_vm.require_agent()
    marker = "mvmsandboxmarker" + secrets.token_hex(16)
    path = f"/work/private-{secrets.token_hex(4)}.txt"
    call(agent.write_file(path, marker.encode()))
    try:
        r = root_sh(call, other, f"test -e {path}; echo exists=$?")
        assert r.stdout == b"exists=1\n"
        r = root_sh(call, other, search_everywhere(split_marker(marker)), timeout=180)
        assert r.stdout.decode().strip().endswith("found=0"), r.stdout
        # and the other way round: B's /work is its own
        call(other.write_file(path, b"b's own\n"))
        assert call(agent.read_file(path)) == marker.encode()
        assert call(other.read_file(path)) == b"b's own\n"
    finally:
        call(agent.remove(path))


# ----------------------------------------------------------------------------- disk, memory


@pytest.fixture(scope="module")
def small_vm(start_vm: Callable[..., MicroVM], loop_thread: LoopThread) -> Iterator[MicroVM]:
    """A VM with a 128 MiB writable layer, cold-booted (its own shape: no template)."""
    vm = start_vm(fast=False, overlay_size="128m", memory_mb=384)
    try:
        yield vm
    finally:
        loop_thread.call(vm.destroy(), timeout=30)


def host_free_bytes() -> int:
    """Free bytes on the filesystems a VM could write through: MVM_HOME's and the run dir's."""
    total = 0
    for d in {paths.home(), paths.run_dir()}:
        d.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(d)
        total += st.f_bavail * st.f_frsize
    return total


def test_filling_the_guest_disk_ends_in_enospc_not_in_the_host(
    call: Call, small_vm: MicroVM
) -> None:
    agent = small_vm.require_agent()
    free_before = host_free_bytes()
    r = root_sh(call, agent, "dd if=/dev/zero of=/work/fill bs=1M 2>&1; echo rc=$?", timeout=180)
    out = r.stdout.decode()
    assert "No space left on device" in out and "rc=0" not in out, out
    r = root_sh(call, agent, "du -sm /work/fill | cut -f1")
    written = int(r.stdout) * MIB
    assert written >= 100 * MIB  # the guest did fill its 128 MiB layer
    drop = free_before - host_free_bytes()
    assert drop < 64 * MIB, f"host free space dropped by {drop / MIB:.0f} MiB"
    # the agent refuses writes with a clear code, and keeps answering
    with pytest.raises(AgentError) as ei:
        call(agent.write_file("/work/more", b"x" * P.MAX_PAYLOAD))
    assert ei.value.data["code"] == P.E_NO_SPACE
    r = call(agent.exec(["echo", "still here"], timeout=30))
    assert r.stdout == b"still here\n"
    call(agent.remove("/work/fill"))
    call(agent.write_file("/work/more", b"fits again"))


def test_exhausting_guest_memory_kills_the_command_not_the_agent(
    call: Call, small_vm: MicroVM
) -> None:
    agent = small_vm.require_agent()
    hog = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
    r = call(agent.exec(["python3", "-c", hog], timeout=120), timeout=150)
    assert (r.signal, r.exit_code) == (9, 137), r  # the kernel's OOM killer, not the agent
    r = call(agent.exec(["echo", "agent alive"], timeout=30))
    assert r.stdout == b"agent alive\n"
    assert small_vm.qemu.alive()
