"""Image builds for real: cache hits, an interrupted build that must not be reused,
and the `minimal` preset booting. Uses its own MVM_HOME so the shared store is untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]


def mvmctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MVMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_second_build_of_same_manifest_is_a_cache_hit() -> None:
    """The default image is already built by install.sh; building again reuses it."""
    first = mvmctl("build", "--preset", "python", "--json")
    assert first.returncode == 0, first.stderr
    rec1 = json.loads(first.stdout)
    mtime = Path(rec1["rootfs"]).stat().st_mtime
    second = mvmctl("build", "--preset", "python", "--json")
    assert second.returncode == 0, second.stderr
    rec2 = json.loads(second.stdout)
    assert rec2["id"] == rec1["id"]
    assert rec2["built_at"] == rec1["built_at"]
    assert Path(rec2["rootfs"]).stat().st_mtime == mtime


def test_interrupted_build_is_never_reused(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Kill a build in the middle of mmdebstrap: nothing looks built afterwards, the next
    build starts clean, and the image it makes boots (the `minimal` preset)."""
    home = Path("/tmp") / f"mvm-int-{os.getpid()}"
    env = {**os.environ, "MVM_HOME": str(home)}
    try:
        proc = subprocess.Popen(
            [*MVMCTL, "build", "--preset", "minimal"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while not list((home / "rootfs").glob(".tmp-rootfs-*/tree/usr")):
            assert proc.poll() is None, "build ended before it could be interrupted"
            assert time.monotonic() < deadline, "mmdebstrap never started"
            time.sleep(0.2)
        # kill it mid-install: once dpkg has unpacked binaries into the tree (bounded poll)
        while not list((home / "rootfs").glob(".tmp-rootfs-*/tree/usr/bin/*")):
            assert proc.poll() is None, "build ended before it could be interrupted"
            assert time.monotonic() < deadline, "mmdebstrap never unpacked a package"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

        assert not (home / "images" / "minimal.json").exists()
        assert not list((home / "rootfs").glob("*.ext4"))
        listed = mvmctl("images", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        built = mvmctl("build", "--preset", "minimal", "--json", env=env)
        assert built.returncode == 0, built.stderr
        assert json.loads(built.stdout)["name"] == "minimal"
        assert not list((home / "rootfs").glob(".tmp*")), "leftovers of the killed build remain"

        out = mvmctl(
            "run",
            "--image",
            "minimal",
            "--timeout",
            "30",
            "--",
            "python3",
            "-c",
            "print(6 * 7)",
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "42"
    finally:
        subprocess.run(["pkill", "-9", "-f", str(home)], check=False)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_missing_qemu_is_a_clear_error() -> None:
    r = mvmctl(
        "run", "--", "true", env={**os.environ, "MVM_QEMU": "/nonexistent/qemu-system-x86_64"}
    )
    assert r.returncode == 125
    assert "QEMU not found" in r.stderr
    assert "MVM_QEMU" in r.stderr


def test_unknown_preset_and_image_list_what_exists() -> None:
    r = mvmctl("build", "--preset", "no-such-preset")
    assert r.returncode == 125
    assert "unknown preset" in r.stderr and "python" in r.stderr
    r = mvmctl("run", "--image", "no-such-image", "--", "true")
    assert r.returncode == 125
    assert "not built" in r.stderr and "python-3.11" in r.stderr
    r = mvmctl("run", "--json", "--image", "no-such-image", "--", "true")
    assert r.returncode == 125
    assert json.loads(r.stdout)["error"] == "ImageNotFound"
