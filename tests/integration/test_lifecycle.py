"""Booting and destroying VMs: cold boots, failed boots, shutdown, and cleanup."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mvm import paths
from mvm.errors import InvalidArgument, VMBootTimeout, VMDied, VMError
from mvm.images.store import Image
from mvm.vm import MicroVM, VMSpec, new_id

#: Per test, fixture setup included: a first boot may have to make a boot template
#: (a cold boot under TCG on a loaded 2-core host).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(180), pytest.mark.usefixtures("run_dir_env")]

#: The ``call`` fixture: run a coroutine on the VM loop, bounded.
Call = Callable[..., Any]
BootVM = Callable[..., MicroVM]
AssertGone = Callable[[Path], None]


def test_cold_boot_without_a_template(call: Call, boot_vm: BootVM, assert_gone: AssertGone) -> None:
    vm = boot_vm(fast=False)
    assert vm.restored is False
    assert vm.boot_seconds > 0
    assert vm.accel in ("kvm", "tcg")
    info = vm.require_agent().info
    assert info["version"] == 1 and info["kernel"] == vm.spec.image.kernel_release
    r = call(vm.require_agent().exec(["sh", "-c", "echo cold; cat /proc/sys/kernel/hostname"]))
    assert r.stdout == b"cold\nmvm\n"
    run_dir = vm.run_dir
    assert run_dir.parent == paths.run_dir()
    assert {"agent.sock", "qmp.sock", "console.sock"} <= {p.name for p in run_dir.iterdir()}
    call(vm.destroy(), timeout=30)
    assert_gone(run_dir)


def test_restored_vms_are_distinct(call: Call, boot_vm: BootVM) -> None:
    """Two VMs restored from the same template (the same RAM image) get different ids
    and different randomness: the handshake reseeds the guest RNG."""
    a, b = boot_vm(), boot_vm()
    assert a.id != b.id and a.run_dir != b.run_dir
    script = [
        "python3",
        "-c",
        "import os, random; print(os.urandom(16).hex(), random.getrandbits(64))",
    ]
    ra = call(a.require_agent().exec(script))
    rb = call(b.require_agent().exec(script))
    assert ra.exit_code == rb.exit_code == 0
    ua, pa = ra.stdout.split()
    ub, pb = rb.stdout.split()
    assert ua != ub, "two clones produced the same /dev/urandom bytes"
    assert pa != pb, "two clones produced the same Python random numbers"


def test_async_context_manager_destroys(call: Call, image: Image, assert_gone: AssertGone) -> None:
    async def scenario() -> tuple[MicroVM, bytes]:
        async with await MicroVM.boot(VMSpec(image)) as vm:
            r = await vm.require_agent().exec(["echo", "in"])
        return vm, r.stdout

    vm, out = call(scenario(), timeout=180)
    assert out == b"in\n"
    assert not vm.qemu.alive()
    assert_gone(vm.run_dir)


def test_guest_shutdown_ends_the_vm(call: Call, boot_vm: BootVM, assert_gone: AssertGone) -> None:
    vm = boot_vm()
    agent = vm.require_agent()
    call(agent.shutdown(), timeout=20)
    deadline = time.monotonic() + 20
    while vm.qemu.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not vm.qemu.alive(), "QEMU kept running after the guest powered off"
    with pytest.raises(VMDied):
        call(agent.ping(), timeout=10)
    call(vm.destroy(), timeout=30)
    assert_gone(vm.run_dir)


def test_boot_timeout_leaves_nothing_behind(
    call: Call, image: Image, assert_gone: AssertGone
) -> None:
    vm_id = new_id()
    # QEMU stays alive, the agent is just not up within 0.5 s: a boot timeout (VMDied is the
    # answer only for a QEMU that died). The call's bound is the hang check.
    with pytest.raises(VMBootTimeout) as ei:
        call(MicroVM.boot(VMSpec(image), vm_id=vm_id, boot_timeout=0.5, fast=False), timeout=60)
    assert "did not answer within 0.5s" in str(ei.value)
    assert ei.value.hint == "see the console log; raise MVM_BOOT_TIMEOUT on a slow host"
    assert_gone(paths.run_dir() / vm_id)


def test_boot_of_a_broken_root_filesystem_fails_with_the_reason(
    call: Call, image: Image, tmp_path: Path, assert_gone: AssertGone
) -> None:
    bad = tmp_path / "broken.ext4"
    with bad.open("wb") as f:
        f.truncate(8 << 20)  # zeros: not an ext4 filesystem
    broken = msgspec.structs.replace(image, rootfs=str(bad), id="it-broken-rootfs")
    vm_id = new_id()
    with pytest.raises(VMError) as ei:
        call(MicroVM.boot(VMSpec(broken), vm_id=vm_id, boot_timeout=120, fast=False), timeout=150)
    # VMDied with the console's reason, not VMBootTimeout: noticed when it died, not at 120 s
    assert type(ei.value) is VMDied, repr(ei.value)
    assert "cannot mount the root filesystem" in str(ei.value)
    assert_gone(paths.run_dir() / vm_id)


@pytest.mark.parametrize(("cpus", "memory_mb"), [(0, 512), (17, 512), (1, 64)])
def test_invalid_shape_is_refused_before_qemu_starts(
    call: Call, image: Image, cpus: int, memory_mb: int, assert_gone: AssertGone
) -> None:
    vm_id = new_id()
    with pytest.raises(InvalidArgument):
        call(
            MicroVM.boot(VMSpec(image, cpus=cpus, memory_mb=memory_mb), vm_id=vm_id, fast=False),
            timeout=30,
        )
    assert_gone(paths.run_dir() / vm_id)


def test_too_long_run_dir_is_a_clear_error(
    call: Call, image: Image, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    long_dir = tmp_path / ("d" * 120)
    monkeypatch.setenv("MVM_RUN_DIR", str(long_dir))
    with pytest.raises(InvalidArgument, match="run directory path too long") as ei:
        call(MicroVM.boot(VMSpec(image), fast=False), timeout=30)
    assert ei.value.hint == "set MVM_RUN_DIR (or MVM_HOME) to a shorter path"
    assert not long_dir.exists()  # refused before anything is made
