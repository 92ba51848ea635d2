"""Image build times: a preset built on the host vs the same packages built inside the
builder VM, and the import time of a ~100 MB OCI archive.

    python bench/build.py [--preset minimal] [--skip-debian] [--oci-mb 100]

Uses the current ``MVM_HOME``. Under TCG the builder VM emulates every instruction of
mmdebstrap/dpkg, so expect the builder to be many times slower than the host there; the
≤ 1.5x goal is for KVM hosts. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.ocitools import Layer, Member, write_oci

from mvm.builder.build import _debian_source, epoch, import_oci
from mvm.builder.vmrun import Job, run_job
from mvm.images import manifest as manifests
from mvm.images.initramfs import find_busybox
from mvm.images.store import ImageStore
from mvm.vmm import accel


def host_build(preset: str) -> float:
    m = manifests.load_preset(preset)
    t = time.monotonic()
    ImageStore().build(m, rebuild=True)
    return time.monotonic() - t


def builder_build(preset: str) -> float:
    m = manifests.load_preset(preset)
    job = Job(
        _debian_source(m.suite, list(m.packages), None), epoch=epoch(), network_preset="registries"
    )
    t = time.monotonic()
    asyncio.run(run_job(job, ImageStore()))
    return time.monotonic() - t


def oci_import(megabytes: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="mvm-bench-") as tmp:
        members = [
            Member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
            Member("bin/busybox", find_busybox().read_bytes(), mode=0o755),
            Member("bin/sh", kind=tarfile.SYMTYPE, link="busybox"),
        ]
        members += [Member(f"data/blob{i}", os.urandom(1 << 20)) for i in range(megabytes)]
        arch = write_oci(Path(tmp) / "big.tar", [Layer(members)], {}, gz=False)
        size = arch.stat().st_size
        t = time.monotonic()
        import_oci(arch, "bench-oci")
        return time.monotonic() - t, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="minimal")
    ap.add_argument("--skip-debian", action="store_true")
    ap.add_argument("--oci-mb", type=int, default=100)
    a = ap.parse_args()
    out: dict[str, object] = {"accel": accel.detect().accel, "preset": a.preset}
    if not a.skip_debian:
        out["host_build_s"] = round(host_build(a.preset), 1)
        out["builder_build_s"] = round(builder_build(a.preset), 1)
        out["ratio"] = round(float(out["builder_build_s"]) / float(out["host_build_s"]), 2)  # type: ignore[arg-type]
    secs, size = oci_import(a.oci_mb)
    out["oci_import_s"], out["oci_archive_bytes"] = round(secs, 1), size
    print(json.dumps(out))


if __name__ == "__main__":
    main()
