"""The QEMU command line, as a pure function of a VM config (tested without a VM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The shape's bounds (one rule, in api.models); the VM config checks them again because
# it is also built by code that never saw a shape (templates, fork, the builder).
from mvm.api.models import MAX_CPUS, MAX_MEMORY_MB, MIN_MEMORY_MB

AGENT_PORT_NAME = "org.mvm.agent"


@dataclass(frozen=True)
class VMConfig:
    kernel: Path
    initrd: Path
    rootfs: Path
    run_dir: Path  # holds the sockets
    cpus: int = 1
    memory_mb: int = 512
    accel: str = "tcg"
    tsc_khz: int | None = None
    overlay_size: str = "50%"  # tmpfs for the writable layer (size= syntax of tmpfs)
    qemu: str = "qemu-system-x86_64"
    extra_cmdline: tuple[str, ...] = field(default_factory=tuple)
    #: Guest RAM backed by this file (for templates and their clones) instead of anonymous memory.
    memory_file: Path | None = None
    #: share=on (a template writes its RAM to the file) or off (a clone maps it copy-on-write).
    memory_shared: bool = True
    #: Start paused, waiting for ``migrate-incoming`` (restoring a snapshot).
    incoming: bool = False
    #: A NIC: user-mode networking with ``restrict=on`` whose only way out is a guestfwd
    #: to ``EGRESS_ADDR`` running ``egress_relay + [egress_socket]`` per guest connection.
    network: bool = False
    #: Program (argv) QEMU runs for each guest connection to the egress address; its
    #: stdin/stdout are the connection, its last argument the proxy's Unix socket.
    egress_relay: tuple[str, ...] = ()
    #: Extra virtio-blk disks after the root (the builder's input, scratch and output):
    #: (raw file, read-only, serial); the guest finds them by serial in /sys/block/*/serial.
    extra_disks: tuple[tuple[Path, bool, str], ...] = ()

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def egress_socket(self) -> Path:
        return self.run_dir / "egress.sock"


def validate(cfg: VMConfig) -> list[str]:
    """Problems with a config, as messages (empty when fine)."""
    errs = []
    if not 1 <= cfg.cpus <= MAX_CPUS:
        errs.append(f"cpus must be between 1 and {MAX_CPUS} (got {cfg.cpus})")
    if not MIN_MEMORY_MB <= cfg.memory_mb <= MAX_MEMORY_MB:
        errs.append(
            f"memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB (got {cfg.memory_mb})"
        )
    if cfg.accel not in ("kvm", "tcg"):
        errs.append(f"accel must be kvm or tcg (got {cfg.accel})")
    if cfg.network:
        if not cfg.egress_relay:
            errs.append("a network needs an egress relay program")
        for arg in (*cfg.egress_relay, str(cfg.egress_socket)):
            # QEMU hands the command to a shell-like splitter: keep every word plain.
            if not arg or not set(arg) <= _PLAIN:
                errs.append(f"egress relay argument {arg!r} has characters QEMU cannot pass")
    for path, _ro, serial in cfg.extra_disks:
        if not serial.isalnum() or len(serial) > 20 or not set(str(path)) <= _PLAIN:
            errs.append(f"extra disk {path} ({serial!r}) has characters QEMU cannot pass")
    return errs


def disk_args(cfg: VMConfig) -> list[str]:
    """``-drive``/``-device`` pairs for the extra disks (none for ordinary sandboxes)."""
    out: list[str] = []
    for i, (path, ro, serial) in enumerate(cfg.extra_disks, 1):
        mode = "on" if ro else "off"
        out += ["-drive", f"id=x{i},file={path},format=raw,if=none,read-only={mode}"]
        out += ["-device", f"virtio-blk-device,drive=x{i},serial={serial}"]
    return out


#: Characters allowed in a guestfwd command word (no spaces, quotes, commas, shell syntax).
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+=@%")
#: The guest's one way out: the egress proxy's address on the slirp network.
EGRESS_ADDR = "10.0.2.100"
EGRESS_PORT = 3128


def netdev_args(cfg: VMConfig) -> list[str]:
    """``-netdev``/``-device`` for a sandbox with a network, empty without one."""
    if not cfg.network:
        return []
    cmd = " ".join([*cfg.egress_relay, str(cfg.egress_socket)])
    netdev = (
        "user,id=n0,restrict=on,net=10.0.2.0/24,host=10.0.2.2,ipv6=off,"
        f"guestfwd=tcp:{EGRESS_ADDR}:{EGRESS_PORT}-cmd:{cmd.replace(',', ',,')}"
    )
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=n0"]


def kernel_cmdline(cfg: VMConfig) -> str:
    args = [
        "console=ttyS0",
        "quiet",
        "loglevel=4",
        "reboot=t",
        "panic=-1",  # a panicking guest reboots, and -no-reboot turns that into QEMU exiting
        "8250.nr_uarts=1",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "random.trust_cpu=on",
        "rdinit=/init",
        f"mvm.overlay={cfg.overlay_size}",
    ]
    if cfg.network:
        args.append("mvm.net=1")  # /init configures eth0
    if cfg.tsc_khz:
        # With acpi=on the guest cannot calibrate its TSC and boots very slowly without this.
        args.append(f"tsc_early_khz={cfg.tsc_khz}")
    args += list(cfg.extra_cmdline)
    return " ".join(args)


def build_argv(cfg: VMConfig) -> list[str]:
    """QEMU argv for a ``-M microvm`` guest: no default devices, no display, and no NIC
    unless ``cfg.network`` (then only the restricted egress one)."""
    if cfg.accel == "kvm":
        accel, cpu = ["-accel", "kvm"], "host"
    else:
        accel, cpu = ["-accel", "tcg,thread=multi"], "max"
    # acpi=on: this kernel only finds virtio-mmio devices through ACPI. RAM is always a
    # backend object named "mem", so snapshots move between cold VMs, templates and clones.
    machine = "microvm,acpi=on,pit=off,pic=off,rtc=on,x-option-roms=off,memory-backend=mem"
    if cfg.memory_file is not None:
        share = "on" if cfg.memory_shared else "off"
        backend = f"memory-backend-file,id=mem,size={cfg.memory_mb}M,mem-path={cfg.memory_file},share={share}"
    else:
        backend = f"memory-backend-ram,id=mem,size={cfg.memory_mb}M"
    incoming = ["-incoming", "defer"] if cfg.incoming else []
    return [
        cfg.qemu,
        "-M", machine,
        *accel,
        "-cpu", cpu,
        "-smp", str(cfg.cpus),
        "-m", f"{cfg.memory_mb}M",
        "-object", backend,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", kernel_cmdline(cfg),
        "-chardev", f"socket,id=console,path={cfg.console_socket},server=on,wait=off",
        "-serial", "chardev:console",
        "-drive", f"id=root,file={cfg.rootfs},format=raw,if=none,read-only=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={cfg.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off",
        *netdev_args(cfg),
        *disk_args(cfg),
        *incoming,
    ]  # fmt: skip
