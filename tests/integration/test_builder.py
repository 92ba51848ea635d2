"""The builder VM against real QEMU: OCI imports (busybox-only, hostile), a Dockerfile,
egress refused in a build step, a killed build, and byte-identical rebuilds.

Archives are made here with tarfile/json (no registry); the busybox layer carries the
host's static busybox, so the imported image has no Python of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mvm import audit
from mvm.builder.build import build_dockerfile, import_oci
from mvm.builder.dockerfile import DockerfileError
from mvm.errors import ImageBuildError
from mvm.images.initramfs import find_busybox
from mvm.images.store import ImageStore
from mvm.oneshot import run_once
from tests.integration.conftest import qemu_pids, wait_no_qemu
from tests.ocitools import Layer, Member, write_oci

pytestmark = pytest.mark.timeout(1500)


def busybox_layers(marker: bytes) -> list[Layer]:
    bb = find_busybox().read_bytes()
    return [
        Layer(
            [
                Member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
                Member("bin/busybox", bb, mode=0o755),
                *[
                    Member(f"bin/{n}", kind=tarfile.SYMTYPE, link="busybox")
                    for n in ("sh", "cat", "wget", "echo", "ls")
                ],
                Member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
                Member("etc/old", b"removed by a whiteout"),
            ]
        ),
        Layer(
            [
                Member("etc/.wh.old"),
                Member("data/", kind=tarfile.DIRTYPE, mode=0o755),
                Member("data/marker", marker, uid=1000, gid=1000, mode=0o640),
                Member("data/link", kind=tarfile.SYMTYPE, link="marker"),
            ]
        ),
    ]


def store_state(store: ImageStore) -> tuple[set[str], set[str]]:
    rootfs = {p.name for p in store.rootfs_dir.glob("*")} if store.rootfs_dir.is_dir() else set()
    records = {p.name for p in store.records.glob("*.json")}
    return rootfs, records


def test_busybox_oci_import_runs_and_rebuilds_identically(
    run_dir_env: Path, tmp_path: Path
) -> None:
    arch = write_oci(
        tmp_path / "bb.tar",
        busybox_layers(b"busybox-marker\n"),
        {"Env": ["PATH=/bin"], "Cmd": ["cat", "/data/marker"]},
    )
    first = import_oci(arch, "test-bb")
    assert first.build["config"]["cmd"] == ["cat", "/data/marker"]
    r = asyncio.run(run_once(["cat", "/data/link"], image="test-bb", timeout=60))
    assert (r.exit_code, r.stdout) == (0, b"busybox-marker\n")
    r = asyncio.run(run_once(["ls", "/etc/old"], image="test-bb", timeout=60))
    assert r.exit_code != 0  # the whiteout removed it
    second = import_oci(arch, "test-bb")
    assert second.rootfs_sha256 == first.rootfs_sha256
    assert second.id == first.id
    recs = [json.loads(line) for line in audit.default_path().read_text().splitlines()[-50:]]
    built = [
        x
        for x in recs
        if x.get("event") == "image.built" and x.get("data", {}).get("image_id") == first.id
    ]
    assert built and "archive" in json.dumps(built[-1])


def test_hostile_layer_refused_leaves_nothing(run_dir_env: Path, tmp_path: Path) -> None:
    layers = [
        Layer([Member("esc", kind=tarfile.SYMTYPE, link="/")]),
        Layer([Member("esc/etc/mvm-pwned", b"x")]),
    ]
    arch = write_oci(tmp_path / "bad.tar", layers, {})
    store = ImageStore()
    before = store_state(store)
    with pytest.raises(ImageBuildError, match="through the link"):
        import_oci(arch, "test-hostile")
    assert store_state(store) == before
    assert store.find("test-hostile") is None
    assert not list(store.rootfs_dir.glob(".tmp-build-*"))


def test_dockerfile_from_archive_builds_and_runs(run_dir_env: Path, tmp_path: Path) -> None:
    write_oci(tmp_path / "base.tar", busybox_layers(b"base\n"), {"Env": ["PATH=/bin"]})
    (tmp_path / "hello.txt").write_text("copied in\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM base.tar\nENV GREETING=hi-from-env\nWORKDIR /app\nCOPY hello.txt ./\n"
        'RUN echo "$GREETING" > made.txt\nCMD ["cat", "/app/made.txt"]\n'
    )
    img = build_dockerfile(tmp_path / "Dockerfile", tmp_path, "test-df")
    assert (tmp_path / "mvm.lock").is_file()
    r = asyncio.run(
        run_once(
            ["sh", "-c", "cat /app/hello.txt /app/made.txt; echo $GREETING"],
            image=img.name,
            timeout=60,
        )
    )
    assert r.stdout == b"copied in\nhi-from-env\nhi-from-env\n", r.stderr


def test_unsupported_instruction_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm\nRUN true\nEXPOSE 80\n")
    with pytest.raises(DockerfileError, match="line 3: EXPOSE"):
        build_dockerfile(tmp_path / "Dockerfile", tmp_path, "test-bad")


def test_step_reaching_a_refused_host_fails_and_is_audited(
    run_dir_env: Path, tmp_path: Path
) -> None:
    write_oci(tmp_path / "base.tar", busybox_layers(b"b\n"), {"Env": ["PATH=/bin"]})
    (tmp_path / "Dockerfile").write_text(
        "FROM base.tar\nRUN wget -q -O /x http://mvm-not-allowed.example.org/\n"
    )
    with pytest.raises(ImageBuildError, match="line 2"):
        build_dockerfile(tmp_path / "Dockerfile", tmp_path, "test-egress")
    recs = [json.loads(line) for line in audit.default_path().read_text().splitlines()[-200:]]
    denied = [
        x
        for x in recs
        if "egress" in str(x.get("event")) and "mvm-not-allowed.example.org" in json.dumps(x)
    ]
    assert denied, "the refused connection is in the audit log"


def test_killed_build_leaves_no_image(run_dir_env: Path, tmp_path: Path) -> None:
    arch = write_oci(tmp_path / "bb.tar", busybox_layers(b"k\n"), {})
    store = ImageStore()
    before = store_state(store)
    code = f"from pathlib import Path; from mvm.builder.build import import_oci; import_oci(Path({str(arch)!r}), 'test-killed')"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 300

    def scratches() -> list[Path]:  # the builder sandbox's scratch disk, in its run dir
        found = []
        for p in run_dir_env.glob("*/scratch.img"):
            with contextlib.suppress(OSError):  # another test's builder may just be leaving
                if p.stat().st_blocks > 0:
                    found.append(p)
        return found

    def building() -> bool:  # the builder has started writing its scratch disk
        return bool(scratches())

    while not building() and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.2)  # polling, bounded by the deadline
    assert building(), "the build started in the builder VM"
    builder_dir = scratches()[0].parent
    for pid in qemu_pids(builder_dir):
        os.kill(pid, signal.SIGKILL)  # the builder VM dies mid-build
    assert proc.wait(120) != 0
    assert wait_no_qemu(builder_dir, 30) == []
    assert not builder_dir.exists()  # the service removed the builder's run directory
    assert not list(store.rootfs_dir.glob(".tmp-build-*"))
    rootfs, records = store_state(store)
    assert {n for n in rootfs if n.endswith(".ext4")} == {
        n for n in before[0] if n.endswith(".ext4")
    }
    assert records == before[1]
    assert store.find("test-killed") is None
