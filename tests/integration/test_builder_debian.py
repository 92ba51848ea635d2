"""``FROM debian:bookworm`` built by the builder VM from Debian packages (mmdebstrap
through its egress proxy), and ``--locked``: a build whose inputs differ from
``mvm.lock`` is refused before anything boots, and a matching one rebuilds the same bytes
and leaves the lock as it was. The Debian image is built once for the module (minutes
under TCG). An ``mvm.toml`` project's ``[build]`` steps (``files``, ``run``, ``env``,
``workdir``, ``user``) run in the builder against a Debian root it makes, and the
``image.built`` record names the manifest and context hashes. A pin the mirror no longer serves is checked without a VM
(``tests/unit/test_builder_lock.py``): a third Debian build here would cost CI minutes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mvm import audit
from mvm.builder import lock as locks
from mvm.builder import steps as stepmod
from mvm.builder.build import build_dockerfile, build_project, epoch
from mvm.errors import MvmError
from mvm.images.store import Image, ImageStore
from mvm.oneshot import run_once

# Two Debian builds inside the builder VM: about 20 minutes on an idle 2-core TCG host, an
# hour under load. ./run-tests.sh runs them only with MVM_LONG_TESTS=1 (CI's budget).
pytestmark = [pytest.mark.vm, pytest.mark.long, pytest.mark.timeout(3600)]

DOCKERFILE = """\
FROM debian:bookworm
ENV GREETING=hello-debian
WORKDIR /app
COPY hello.txt ./
RUN echo "$GREETING on $(. /etc/os-release && echo $VERSION_CODENAME)" > made.txt
CMD ["cat", "/app/made.txt"]
"""


def project(root: Path, dockerfile: str = DOCKERFILE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    (root / "hello.txt").write_text("copied in\n")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Image]:
    """The project (with the ``mvm.lock`` its first build wrote) and its image."""
    proj = project(tmp_path_factory.mktemp("deb") / "app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MVM_RUN_DIR", str(tmp_path_factory.mktemp("run")))
        img = build_dockerfile(proj / "Dockerfile", proj, "test-deb")
    return proj, img


def lock_doc(proj: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((proj / locks.LOCK_NAME).read_text())
    return doc


def test_debian_dockerfile_builds_runs_and_is_locked(
    built: tuple[Path, Image], run_dir_env: Path
) -> None:
    proj, img = built
    r = asyncio.run(
        run_once(
            ["sh", "-c", "cat hello.txt made.txt; cat /etc/debian_version; echo $GREETING"],
            image=img.name,
            timeout=120,
        )
    )
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[:2] == ["copied in", "hello-debian on bookworm"]
    assert lines[2].startswith("12.") and lines[3] == "hello-debian"
    doc = lock_doc(proj)
    assert doc["image_id"] == img.id and doc["rootfs_sha256"] == img.rootfs_sha256
    pins = dict(p.split("=", 1) for p in doc["packages"])
    assert {"python3-minimal", "dpkg", "base-files"} <= set(pins)
    assert set(doc["inputs"]) == {"dockerfile", "context"}


def test_locked_build_with_changed_inputs_is_refused_before_booting(
    built: tuple[Path, Image], tmp_path: Path
) -> None:
    proj, _ = built
    changed = project(tmp_path / "app", DOCKERFILE.replace("made.txt\n", "made.txt && true\n"))
    shutil.copy(proj / locks.LOCK_NAME, changed / locks.LOCK_NAME)
    before = (changed / locks.LOCK_NAME).read_text()
    with pytest.raises(MvmError, match=r"--locked: the inputs differ.*\(dockerfile\)") as info:
        build_dockerfile(changed / "Dockerfile", changed, "test-deb-changed", locked=True)
    assert "would change mvm.lock" in info.value.message
    assert (changed / locks.LOCK_NAME).read_text() == before
    (changed / "hello.txt").write_text("other context\n")
    shutil.copy(proj / "Dockerfile", changed / "Dockerfile")
    with pytest.raises(MvmError, match=r"inputs differ.*\(context\)"):
        build_dockerfile(changed / "Dockerfile", changed, "test-deb-changed", locked=True)
    assert ImageStore().find("test-deb-changed") is None
    (changed / locks.LOCK_NAME).unlink()
    with pytest.raises(MvmError, match=r"no mvm\.lock"):
        build_dockerfile(changed / "Dockerfile", changed, "test-deb-changed", locked=True)


def test_locked_build_that_matches_rebuilds_the_same_image(
    built: tuple[Path, Image], run_dir_env: Path
) -> None:
    proj, img = built
    before = (proj / locks.LOCK_NAME).read_text()
    again = build_dockerfile(proj / "Dockerfile", proj, "test-deb", locked=True)
    assert (again.id, again.rootfs_sha256) == (img.id, img.rootfs_sha256)
    assert (proj / locks.LOCK_NAME).read_text() == before


MANIFEST = """\
[image]
name = "test-deb-steps"
packages = ["python3-minimal"]

[build]
files = ["hello.txt"]
workdir = "/app"
user = "user"
env = { GREETING = "hello-steps" }
run = ['cat hello.txt > /home/user/made.txt && echo "$GREETING as $(id -un) in $PWD" >> /home/user/made.txt']
"""


def test_manifest_build_steps_run_in_the_builder_and_are_audited(
    run_dir_env: Path, tmp_path: Path
) -> None:
    proj = tmp_path / "app"
    proj.mkdir()
    (proj / "mvm.toml").write_text(MANIFEST)
    (proj / "hello.txt").write_text("copied in\n")
    img = build_project(proj)
    assert img is not None and img.name == "test-deb-steps"
    r = asyncio.run(
        run_once(
            [
                "sh",
                "-c",
                "stat -c '%U %n' /app/hello.txt /home/user/made.txt; cat /home/user/made.txt",
            ],
            image=img.name,
            timeout=120,
        )
    )
    assert r.exit_code == 0, r.stderr
    # files are copied as root (like COPY without --chown); the run step ran as `user`,
    # in workdir (it read hello.txt by a relative path), with [build]'s env
    assert r.stdout.decode().splitlines() == [
        "root /app/hello.txt",
        "user /home/user/made.txt",
        "copied in",
        "hello-steps as user in /app",
    ]
    ctx = tmp_path / "ctx.tar"  # the context tar is deterministic: rebuild it to hash it
    stepmod.write_context_tar(stepmod.collect(proj, ["hello.txt"], "mvm.toml"), epoch(), ctx)
    inputs = {
        "manifest": hashlib.sha256(MANIFEST.encode()).hexdigest(),
        "context": hashlib.sha256(ctx.read_bytes()).hexdigest(),
    }
    assert lock_doc(proj)["inputs"] == inputs
    recs = [json.loads(line) for line in audit.default_path().read_text().splitlines()]
    built = [
        x
        for x in recs
        if x.get("event") == "image.built" and x.get("data", {}).get("image_id") == img.id
    ]
    assert built, "no image.built record for the image"
    data = built[-1]["data"]
    assert data["inputs"] == inputs and data["image"] == "test-deb-steps"
    # mmdebstrap fetched the packages through the builder's egress proxy, audited under
    # the builder sandbox the record names
    egress = [
        x
        for x in recs
        if x.get("event") == "egress.allowed" and x.get("sandbox") == data["builder_vm"]
    ]
    assert egress, f"no egress decision audited for builder {data['builder_vm']!r}"
