"""An image's recorded Cmd/User/WorkingDir applied at run, against real VMs: an OCI import
and a Dockerfile built on it, run bare (the image's CMD), through ``exec`` and
``proc start`` in an mvmd sandbox (the image's user and cwd), and with an explicit
``--user``/``--cwd`` (which wins). Both images are built once for the module."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

import pytest

from mvm.builder.build import build_dockerfile, import_oci
from mvm.images.initramfs import find_busybox
from mvm.images.store import ImageStore
from tests.integration.mvmd_home import Ctl, private_home
from tests.ocitools import Layer, Member, write_oci

pytestmark = pytest.mark.timeout(2400)

PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001::/srv:/bin/sh\nsvc:x:1002:1002::/:/bin/sh\n"
)
GROUP = b"root:x:0:\napp:x:1001:\nsvc:x:1002:\n"
SHOW = "echo $0; id -un; pwd"


def base_layer() -> Layer:
    bb = find_busybox().read_bytes()
    return Layer(
        [
            Member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
            Member("bin/busybox", bb, mode=0o755),
            *[
                Member(f"bin/{n}", kind=tarfile.SYMTYPE, link="busybox")
                for n in ("sh", "id", "cat", "echo", "sleep")
            ],
            Member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
            Member("etc/passwd", PASSWD),
            Member("etc/group", GROUP),
            Member("srv/", kind=tarfile.DIRTYPE, mode=0o755, uid=1001, gid=1001),
        ]
    )


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctl]:
    """A private home holding ``test-rc-oci`` (OCI config: User 1001, WorkingDir /srv, a
    Cmd) and ``test-rc-df`` (a Dockerfile FROM it: USER svc, WORKDIR /app, its own CMD)."""
    tmp = tmp_path_factory.mktemp("rc")
    with private_home("mvmrc-") as home:
        store = ImageStore(home)
        config: dict[str, object] = {
            "Env": ["PATH=/bin"],
            "User": "1001",
            "WorkingDir": "/srv",
            "Cmd": ["sh", "-c", SHOW, "oci-cmd"],
        }
        oci = import_oci(
            write_oci(tmp / "base.tar", [base_layer()], config), "test-rc-oci", store=store
        )
        assert oci.build["config"]["user"] == "app"  # uid 1001, as the name the agent takes
        (tmp / "Dockerfile").write_text(
            f'FROM test-rc-oci\nUSER svc\nWORKDIR /app\nCMD ["sh", "-c", "{SHOW}", "df-cmd"]\n'
        )
        df = build_dockerfile(tmp / "Dockerfile", tmp, "test-rc-df", store=store)
        assert df.build["config"]["env"]["PATH"] == "/bin"  # the base's Env is kept
        yield Ctl(home)


def test_bare_run_runs_the_images_cmd_as_its_user_in_its_workdir(ctl: Ctl) -> None:
    r = ctl.ok("run", "--image", "test-rc-oci", timeout=600)
    assert r.out == "oci-cmd\napp\n/srv\n", str(r)
    r = ctl.ok("run", "--image", "test-rc-df", timeout=600)
    assert r.out == "df-cmd\nsvc\n/app\n", str(r)


def test_explicit_user_and_cwd_win(ctl: Ctl) -> None:
    r = ctl.ok(
        "run", "--image", "test-rc-df", "--user", "root", "--cwd", "/", "--",
        "sh", "-c", SHOW, "explicit", timeout=600,
    )  # fmt: skip
    assert r.out == "explicit\nroot\n/\n", str(r)


def test_bare_run_of_an_image_without_cmd_is_refused(ctl: Ctl) -> None:
    r = ctl("run", "--image", "python", timeout=120)
    assert r.rc == 2 and "records no CMD" in r.err, str(r)


def test_execs_and_procs_in_a_sandbox_follow_the_image(ctl: Ctl) -> None:
    ctl.ok("up", "--name", "rc1", "--image", "test-rc-df", timeout=600)
    try:
        assert ctl.ok("exec", "rc1", "--", "sh", "-c", SHOW, "x").out == "x\nsvc\n/app\n"
        r = ctl.ok("exec", "rc1", "--user", "app", "--cwd", "/srv", "--", "sh", "-c", SHOW, "y")
        assert r.out == "y\napp\n/srv\n"
        script = "id -un > /tmp/who; pwd >> /tmp/who"
        p = json.loads(ctl.ok("proc", "start", "--json", "rc1", "--", "sh", "-c", script).out)
        ctl.ok("proc", "wait", "rc1", str(p["proc"]))
        assert ctl.ok("exec", "rc1", "--", "cat", "/tmp/who").out == "svc\n/app\n"
    finally:
        ctl("down", "rc1", timeout=120)
