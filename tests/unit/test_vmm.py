"""QEMU argv (pure), accelerator choice (pure) and the bounded console log."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mvm.errors import InvalidArgument
from mvm.vmm import accel
from mvm.vmm.argv import (
    AGENT_PORT_NAME,
    MAX_CPUS,
    MAX_MEMORY_MB,
    MIN_MEMORY_MB,
    VMConfig,
    build_argv,
    kernel_cmdline,
    validate,
)
from mvm.vmm.qemu import BoundedLog


def cfg(**kw: object) -> VMConfig:
    base = VMConfig(
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd.cpio"),
        rootfs=Path("/img/root.ext4"),
        run_dir=Path("/run/mvm/vm1"),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# --------------------------------------------------------------------------- argv


def test_argv_machine_and_isolation() -> None:
    """microvm with ACPI, no default devices, no network, no display, no reboot."""
    argv = build_argv(cfg())
    assert argv[0] == "qemu-system-x86_64"
    (machine,) = opt(argv, "-M")
    assert machine.split(",")[0] == "microvm"
    assert "acpi=on" in machine.split(",")
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    joined = " ".join(argv)
    for net in ("-netdev", "-nic", "-net ", "virtio-net", "user,"):
        assert net not in joined


def test_argv_network_only_when_enabled() -> None:
    """A NIC appears only with ``network``: restricted slirp, one guestfwd to the relay."""
    relay = ("/usr/bin/python3", "-I", "/opt/mvm/egress_relay.py")
    c = cfg(network=True, egress_relay=relay)
    assert validate(c) == []
    argv = build_argv(c)
    (netdev,) = opt(argv, "-netdev")
    parts = netdev.split(",")
    assert parts[0] == "user" and "restrict=on" in parts and "ipv6=off" in parts
    fwds = [p for p in parts if p.startswith("guestfwd=")]
    assert fwds == [
        "guestfwd=tcp:10.0.2.100:3128-cmd:/usr/bin/python3 -I /opt/mvm/egress_relay.py "
        "/run/mvm/vm1/egress.sock"
    ]
    assert "hostfwd" not in netdev
    assert "virtio-net-device,netdev=n0" in opt(argv, "-device")
    assert "mvm.net=1" in kernel_cmdline(c).split()
    assert "mvm.net=1" not in kernel_cmdline(cfg()).split()
    # with network off, the relay setting changes nothing
    assert build_argv(cfg(egress_relay=relay)) == build_argv(cfg())


@pytest.mark.parametrize("bad", ["/a b/relay.py", "/x,y", "/q'uote", "/semi;colon", ""])
def test_network_relay_words_must_be_plain(bad: str) -> None:
    c = cfg(network=True, egress_relay=("/usr/bin/python3", bad))
    assert any("egress relay argument" in e for e in validate(c))
    assert "needs an egress relay" in " ".join(validate(cfg(network=True)))


def test_argv_files_and_sockets() -> None:
    """Kernel, initrd, a read-only root drive, and the three sockets under run_dir."""
    c = cfg()
    argv = build_argv(c)
    assert opt(argv, "-kernel") == ["/k/vmlinux"]
    assert opt(argv, "-initrd") == ["/k/initrd.cpio"]
    (drive,) = opt(argv, "-drive")
    parts = drive.split(",")
    assert "file=/img/root.ext4" in parts
    assert "read-only=on" in parts
    assert "format=raw" in parts
    assert "virtio-blk-device,drive=root" in opt(argv, "-device")
    chardevs = opt(argv, "-chardev")
    assert any(f"path={c.agent_socket}" in x and x.startswith("socket,id=agent") for x in chardevs)
    assert any(f"path={c.console_socket}" in x for x in chardevs)
    assert opt(argv, "-qmp") == [f"unix:{c.qmp_socket},server=on,wait=off"]
    assert c.agent_socket == Path("/run/mvm/vm1/agent.sock")


def test_argv_agent_port() -> None:
    """The guest agent finds its port by this exact name."""
    devices = opt(build_argv(cfg()), "-device")
    assert f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}" in devices
    assert AGENT_PORT_NAME == "org.mvm.agent"


def test_argv_resources() -> None:
    """cpus and memory are passed through."""
    argv = build_argv(cfg(cpus=4, memory_mb=2048))
    assert opt(argv, "-smp") == ["4"]
    assert opt(argv, "-m") == ["2048M"]


@pytest.mark.parametrize(
    ("acc", "accel_arg", "cpu"),
    [("kvm", "kvm", "host"), ("tcg", "tcg,thread=multi", "max")],
)
def test_argv_accel(acc: str, accel_arg: str, cpu: str) -> None:
    """KVM uses the host CPU; TCG uses multi-threaded TCG with the 'max' model."""
    argv = build_argv(cfg(accel=acc))
    assert opt(argv, "-accel") == [accel_arg]
    assert opt(argv, "-cpu") == [cpu]


def test_cmdline_tsc_only_when_known() -> None:
    """tsc_early_khz appears only when the host TSC rate is known."""
    assert "tsc_early_khz" not in kernel_cmdline(cfg())
    assert "tsc_early_khz" not in kernel_cmdline(cfg(tsc_khz=0))
    line = kernel_cmdline(cfg(tsc_khz=2_400_000))
    assert "tsc_early_khz=2400000" in line.split()
    (append,) = opt(build_argv(cfg(tsc_khz=2_400_000)), "-append")
    assert append == line


def test_cmdline_contents() -> None:
    """The guest panics into an exit, boots /init, and gets the overlay size and extras."""
    line = kernel_cmdline(cfg(overlay_size="256m", extra_cmdline=("foo=1", "bar")))
    words = line.split()
    for w in ("console=ttyS0", "panic=-1", "rdinit=/init", "mvm.overlay=256m"):
        assert w in words
    assert words[-2:] == ["foo=1", "bar"]


def test_custom_qemu_binary() -> None:
    assert build_argv(cfg(qemu="/opt/qemu/bin/qemu-system-x86_64"))[0].startswith("/opt/qemu")


def test_validate_ok() -> None:
    """The defaults and the edges of every range are valid."""
    assert validate(cfg()) == []
    assert validate(cfg(cpus=MAX_CPUS, memory_mb=MAX_MEMORY_MB, accel="kvm")) == []
    assert validate(cfg(cpus=1, memory_mb=MIN_MEMORY_MB)) == []


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"cpus": 0}, "cpus must be between 1 and 16 (got 0)"),
        ({"cpus": MAX_CPUS + 1}, "(got 17)"),
        ({"memory_mb": MIN_MEMORY_MB - 1}, "memory must be between 128 and 16384 MiB (got 127)"),
        ({"memory_mb": MAX_MEMORY_MB + 1}, "(got 16385)"),
        ({"accel": "hvf"}, "accel must be kvm or tcg (got hvf)"),
    ],
)
def test_validate_messages(kw: dict[str, object], needle: str) -> None:
    """Each bad field gives one message naming the range and the value."""
    errs = validate(cfg(**kw))
    assert len(errs) == 1
    assert needle in errs[0]


def test_validate_reports_all_problems() -> None:
    assert len(validate(cfg(cpus=0, memory_mb=1, accel="x"))) == 3


# --------------------------------------------------------------------------- accel

CPU_VMX = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\ncpu MHz\t\t: 2399.998\n"
CPU_SVM = "processor\t: 0\nflags\t\t: fpu svm lm\n"
CPU_NONE = "processor\t: 0\nflags\t\t: fpu vme hypervisor vmxnot svmx\nmodel name\t: vmx svm\n"


@pytest.mark.parametrize("forced", ["kvm", "tcg", " KVM ", "Tcg"])
def test_choose_override(forced: str) -> None:
    """MVM_ACCEL wins over detection (case and spaces ignored)."""
    c = accel.choose({"MVM_ACCEL": forced}, CPU_NONE, kvm_opens=False)
    assert c.accel == forced.strip().lower()
    assert c.reason == "MVM_ACCEL"


def test_choose_override_invalid() -> None:
    with pytest.raises(InvalidArgument, match="hvf") as info:
        accel.choose({"MVM_ACCEL": "hvf"}, CPU_VMX, kvm_opens=True)
    assert info.value.hint == "use kvm or tcg"


def test_choose_empty_override_is_ignored() -> None:
    assert accel.choose({"MVM_ACCEL": "  "}, CPU_VMX, kvm_opens=True).accel == "kvm"


def test_choose_no_kvm() -> None:
    c = accel.choose({}, CPU_VMX, kvm_opens=False)
    assert (c.accel, c.reason) == ("tcg", "/dev/kvm cannot be opened")


def test_choose_no_virt_flags() -> None:
    """/dev/kvm without vmx/svm (nested without acceleration) is TCG; substrings don't count."""
    c = accel.choose({}, CPU_NONE, kvm_opens=True)
    assert c.accel == "tcg" and "vmx/svm" in c.reason


@pytest.mark.parametrize("cpuinfo", [CPU_VMX, CPU_SVM])
def test_choose_kvm(cpuinfo: str) -> None:
    assert accel.choose({}, cpuinfo, kvm_opens=True).accel == "kvm"


def test_cpu_has_virt_needs_flags_line() -> None:
    assert accel.cpu_has_virt(CPU_VMX)
    assert not accel.cpu_has_virt("model name : vmx\n")
    assert not accel.cpu_has_virt("")


def test_tsc_khz() -> None:
    """cpu MHz (first CPU) in kHz, truncated; None when absent."""
    assert accel.tsc_khz(CPU_VMX) == 2_399_998
    assert accel.tsc_khz("cpu MHz\t\t: 3000.000\ncpu MHz\t\t: 1200.000\n") == 3_000_000
    assert accel.tsc_khz(CPU_SVM) is None
    assert accel.tsc_khz("") is None


def test_kvm_usable_missing_device(tmp_path: Path) -> None:
    assert accel.kvm_usable(tmp_path / "no-kvm") is False
    dev = tmp_path / "fake"
    dev.write_bytes(b"")
    assert accel.kvm_usable(dev) is True


# --------------------------------------------------------------------------- BoundedLog


def test_bounded_log_small_output(tmp_path: Path) -> None:
    """Below the head limit everything goes to the file and tail() reads it back."""
    log = BoundedLog(tmp_path / "c.log", head=100, tail=10)
    log.write(b"hello ")
    log.write(b"world")
    assert (log.written, log.dropped) == (11, 0)
    assert log.tail(5) == "world"
    assert log.tail() == "hello world"
    log.close()
    assert (tmp_path / "c.log").read_bytes() == b"hello world"


def test_bounded_log_overflow(tmp_path: Path) -> None:
    """Past the head: the file stops growing, the tail stays in memory, drops are counted."""
    log = BoundedLog(tmp_path / "c.log", head=10, tail=8)
    log.write(b"0123456789ABC")  # crosses the head limit inside one write
    for _ in range(100):
        log.write(b"xyz")
    log.write(b"END")
    assert log.written == 10
    assert log.dropped == 3 + 300 + 3
    assert (tmp_path / "c.log").stat().st_size == 10
    assert log.tail(3) == "END"
    assert log.tail(100) == "yzxyzEND"  # only tail_limit bytes are kept
    log.close()
    data = (tmp_path / "c.log").read_bytes()
    assert data.startswith(b"0123456789")
    assert b"306 console bytes not kept" in data
    assert data.endswith(b"yzxyzEND")


def test_bounded_log_memory_bounded(tmp_path: Path) -> None:
    """A flood keeps at most head bytes on disk and tail bytes in memory."""
    log = BoundedLog(tmp_path / "c.log", head=1000, tail=500)
    chunk = b"q" * 65536
    for _ in range(50):
        log.write(chunk)
    assert len(log._tail) == 500
    assert (tmp_path / "c.log").stat().st_size == 1000
    assert log.dropped == 50 * 65536 - 1000
    log.close()


def test_bounded_log_tail_decodes_leniently(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "c.log", head=100, tail=10)
    log.write(b"ok \xff\xfe")
    assert log.tail() == "ok \ufffd\ufffd"
    log.close()


def test_bounded_log_tail_spans_head_and_overflow(tmp_path: Path) -> None:
    """tail(n) is 'the last n bytes printed', also just after the head limit is crossed."""
    log = BoundedLog(tmp_path / "c.log", head=10, tail=100)
    log.write(b"0123456789AB")
    assert log.tail(5) == "789AB"
    log.close()
