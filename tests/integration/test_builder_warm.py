"""Warm builder VMs in mvmd against real QEMU: ``builder up`` -> ``status`` -> ``logs`` ->
a build that uses the warm VM (no boot in the build) -> the replacement booted in the
background -> ``builder down`` (with an mvmd restart between ``up`` and the build: the
builder is reattached); and a build with no builder up boots one on demand, whose
replacement mvmd downs after its idle time; and killing a warm builder mid-build leaves no
image.

One private mvmd home for the module (its image store shared with the default one).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mvmd_home import Ctl, private_home, qemu_pids, wait_until
from tests.integration.test_builder import busybox_layers
from tests.ocitools import write_oci

pytestmark = pytest.mark.timeout(2400)

BOOT = 900.0  # a builder's cold boot under TCG on a loaded host
BUILD = 1500.0


@pytest.fixture(scope="module")
def ctl() -> Iterator[Ctl]:
    with private_home("mvmbw-") as home:
        c = Ctl(home)
        c.env["MVM_BUILDER_IDLE"] = "1800"  # nothing is downed behind a test's back
        yield c


def status(ctl: Ctl) -> dict[str, Any]:
    return dict(ctl.json("builder", "status", timeout=60))


def builders(ctl: Ctl) -> dict[str, dict[str, Any]]:
    return {b["sandbox"]["name"]: b for b in status(ctl)["builders"]}


def built_record(ctl: Ctl, image: str) -> dict[str, Any]:
    audit = ctl.home / "audit"
    recs = [
        json.loads(line)
        for f in sorted(audit.glob("*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    got = [r for r in recs if r.get("event") == "image.built" and r["data"]["image"] == image]
    assert got, f"no image.built record for {image}"
    return dict(got[-1]["data"])


def down_all(ctl: Ctl) -> None:
    """Down every builder, once none is still booting (a down waits for the boot)."""

    def settled() -> bool:
        return all(b["sandbox"]["state"] != "creating" for b in builders(ctl).values())

    assert wait_until(settled, BOOT, interval=2.0)
    ctl.ok("builder", "down", timeout=BOOT)
    assert wait_until(lambda: not builders(ctl), 120)


def test_warm_builder_serves_one_build_then_is_replaced(ctl: Ctl, tmp_path: Path) -> None:
    up = json.loads(ctl.ok("builder", "up", "--idle", "30m", "--json", timeout=BOOT).out)
    name = up["name"]
    got = builders(ctl)
    assert name in got and got[name]["sandbox"]["state"] == "running"
    assert not got[name]["claimed"]
    logs = ctl.ok("builder", "logs", name, timeout=60)
    assert "started from builder" in logs.out, logs.out[-2000:]
    # An mvmd restart reattaches it: its disks are derived from its record alone.
    ctl.ok("daemon", "stop", timeout=60)
    ctl.ok("ls", timeout=120)  # a new mvmd (started by ls) reattaches it
    assert builders(ctl)[name]["sandbox"]["state"] == "running"

    arch = write_oci(
        tmp_path / "bb.tar", busybox_layers(b"warm\n"), {"Cmd": ["cat", "/data/marker"]}
    )
    ctl.ok("build", "--oci", str(arch), "--name", "test-warm", timeout=BUILD)
    rec = built_record(ctl, "test-warm")
    assert rec["builder_vm"] == name  # the warm VM did the build...
    assert rec["builder_boot_seconds"] == 0  # ...so the build booted nothing

    # One build per builder: that one is gone, a fresh one boots in mvmd's background.
    def replaced() -> bool:
        b = builders(ctl)
        return (
            bool(b)
            and name not in b
            and all(x["sandbox"]["state"] == "running" for x in b.values())
        )

    assert wait_until(replaced, BOOT, interval=2.0), status(ctl)
    after = builders(ctl)
    assert len(after) == 1 and name not in after
    down_all(ctl)
    assert status(ctl)["builders"] == []
    assert wait_until(lambda: not qemu_pids(ctl.home), 60)


def test_build_boots_a_builder_on_demand_and_idle_stops_it(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("ls", timeout=60)  # mvmd up (a build uses mvmd only when it runs)
    if builders(ctl):
        down_all(ctl)
    arch = write_oci(tmp_path / "bb.tar", busybox_layers(b"cold\n"), {})
    env = {**ctl.env, "MVM_BUILDER_IDLE": "20"}
    idle = Ctl(ctl.home)
    idle.env = env
    idle.ok("build", "--oci", str(arch), "--name", "test-cold", timeout=BUILD)
    rec = built_record(ctl, "test-cold")
    assert rec["builder_boot_seconds"] > 0  # booted for this build
    assert rec["builder_vm"] not in builders(ctl)  # and downed after it
    # Its replacement is kept for MVM_BUILDER_IDLE seconds, then mvmd downs it.
    assert wait_until(lambda: bool(builders(ctl)), BOOT, interval=2.0)
    (repl,) = builders(ctl)
    assert builders(ctl)[repl]["idle_seconds"] == 20
    r = ctl("wait", repl, "--timeout", "30m", timeout=BOOT + 1800)
    assert r.rc == 0, str(r)
    assert builders(ctl) == {}
    assert wait_until(lambda: not qemu_pids(ctl.home), 60)


def test_killing_the_warm_builder_mid_build_leaves_no_image(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("ls", timeout=60)
    if not builders(ctl):
        ctl.ok("builder", "up", "--idle", "30m", timeout=BOOT)
    (name,) = builders(ctl)
    rundir = Path(builders(ctl)[name]["run_dir"])
    rootfs = ctl.home / "rootfs"  # shared with the default store: other builds land there
    arch = write_oci(tmp_path / "bb.tar", busybox_layers(b"killed\n"), {})
    proc = ctl.popen("build", "--oci", str(arch), "--name", "test-warm-killed")

    def writing() -> bool:  # the driver has formatted the builder's scratch disk
        return (rundir / "scratch.img").stat().st_blocks > 0

    assert wait_until(writing, BUILD, interval=0.5), "the build started in the warm builder"
    for pid in qemu_pids(rundir):
        os.kill(pid, signal.SIGKILL)  # the builder VM dies mid-build
    assert proc.wait(300) != 0
    assert not list(rootfs.glob(".tmp-build-*"))
    assert not (ctl.home / "images" / "test-warm-killed.json").exists()
    with pytest.raises(AssertionError, match=r"no image\.built"):
        built_record(ctl, "test-warm-killed")  # nothing was registered or stored
    assert wait_until(lambda: name not in builders(ctl), 120)  # released: downed
    assert not rundir.exists()
    down_all(ctl)  # its replacement
    assert wait_until(lambda: not qemu_pids(ctl.home), 60)
