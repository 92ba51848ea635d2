"""[build] steps in mvm.toml, the build context (inside the project only), the lock file."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.builder import lock as L
from mvm.builder import steps as S
from mvm.builder.vmrun import check_result, fixed_ids
from mvm.errors import ImageBuildError, ManifestError

TOML = """
[image]
name = "app"
packages = ["python3"]

[build]
files = ["requirements.txt", "src"]
run = ["pip install -r requirements.txt", "echo ok"]
env = { PIP_NO_CACHE_DIR = "1" }
workdir = "/app"
user = "root"
"""


def test_section_to_steps() -> None:
    sec = S.parse_section(TOML, "mvm.toml")
    assert sec is not None
    kinds = [(s.kind, s.args) for s in S.steps_from_section(sec)]
    assert kinds[0] == ("env", ("PIP_NO_CACHE_DIR", "1"))
    assert ("copy", ("requirements.txt", "src", "/app/")) in kinds
    assert kinds[-1] == ("run", ("/bin/sh", "-c", "echo ok"))
    assert S.parse_section('[image]\nname = "x"\n', "m") is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('files = ["../etc/passwd"]', "inside the project"),
        ('files = ["/etc/passwd"]', "inside the project"),
        ('files = ["a/../../x"]', "inside the project"),
        ('workdir = "rel"', "absolute"),
        ('user = "bad user"', "not a user"),
        ('env = { "1X" = "y" }', "invalid variable"),
        ("nope = 1", "[build]"),
        ('allow = ["a b"]', "host[:port]"),
        ('allow = ["http://x"]', "host[:port]"),
        ('allow = [""]', "host[:port]"),
    ],
)
def test_section_errors(body: str, words: str) -> None:
    with pytest.raises(ManifestError) as info:
        S.parse_section(f"[build]\n{body}\n", "mvm.toml")
    assert words in str(info.value)


@given(st.text(max_size=60))
def test_relative_source_never_escapes(src: str) -> None:
    try:
        norm = S.relative_source(src, "t")
    except ManifestError:
        return
    assert not norm.startswith("/") and ".." not in norm.split("/")


def test_collect_refuses_link_escape_and_tars_deterministically(tmp_path: Path) -> None:
    proj = tmp_path / "p"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "a.py").write_text("print(1)\n")
    (proj / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(proj / "run.sh", 0o755)
    (tmp_path / "secret").write_text("host secret")
    (proj / "src" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(ManifestError, match="outside the project"):
        S.collect(proj, ["src"], "t")
    (proj / "src" / "leak").unlink()
    files = S.collect(proj, ["src", "run.sh"], "t")
    assert [f.name for f in files] == ["run.sh", "src/a.py"]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    S.write_context_tar(files, 1, a)
    S.write_context_tar(files, 1, b)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as t:
        m = t.getmember("run.sh")
        assert (m.mode, m.uid, m.mtime) == (0o755, 0, 1)


def test_lock_roundtrip_and_errors(tmp_path: Path) -> None:
    lock = L.Lock(1, "app", {"manifest": "ab"}, ["zlib1g=1:1.2.13", "bash=5.2.15-2+b2"], "cd", "ef")
    L.write(tmp_path, lock)
    assert L.read(tmp_path) == L.Lock(
        1, "app", {"manifest": "ab"}, sorted(lock.packages), "cd", "ef"
    )
    text = (tmp_path / "mvm.lock").read_text()
    assert text.index("bash=") < text.index("zlib1g=")
    with pytest.raises(ManifestError, match="bad package pins"):
        L.loads(text.replace("bash=5.2.15-2+b2", "bash; rm -rf /"), "x")
    with pytest.raises(ManifestError, match=r"no mvm\.lock"):
        L.read(tmp_path / "nowhere")


def test_builder_result_is_validated() -> None:
    size = 64 << 20
    ok = check_result(b'noise\n{"bytes": 4194304, "config": {}, "packages": ["a=1"]}\n', size)
    assert ok["bytes"] == 4194304
    for bad in (
        b"",
        b"not json",
        b"[1]",
        b'{"bytes": 1}',
        b'{"bytes": 1073741824}',
        b'{"bytes": 4194305}',
    ):
        with pytest.raises(ImageBuildError):
            check_result(bad, size)
    with pytest.raises(ImageBuildError, match="build failed in the builder VM: boom"):
        check_result(b'{"error": "boom"}', size)


def test_fixed_ids_are_stable() -> None:
    assert fixed_ids("x") == fixed_ids("x") != fixed_ids("y")


def test_builder_config_is_reduced_to_bounded_fields() -> None:
    from mvm.builder.vmrun import clean_config

    got = clean_config(
        {"env": {"OK": "1", "bad key": "x", "N": 5}, "user": 7, "cmd": ["a", 1], "evil": "x"}
    )
    assert got == {
        "env": {"OK": "1"},
        "workdir": "",
        "user": "",
        "cmd": ["a"],
        "entrypoint": [],
    }


def test_extra_disks_on_the_qemu_command_line(tmp_path: Path) -> None:
    from mvm.vmm.argv import VMConfig, build_argv, validate

    base = VMConfig(
        kernel=tmp_path / "k", initrd=tmp_path / "i", rootfs=tmp_path / "r", run_dir=tmp_path
    )
    assert "serial=mvmscratch" not in " ".join(build_argv(base))
    cfg = VMConfig(
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        rootfs=tmp_path / "r",
        run_dir=tmp_path,
        extra_disks=(
            (tmp_path / "s.img", False, "mvmscratch"),
            (tmp_path / "in.img", True, "mvminput"),
        ),
    )
    argv = " ".join(build_argv(cfg))
    assert f"id=x1,file={tmp_path}/s.img,format=raw,if=none,read-only=off" in argv
    assert "virtio-blk-device,drive=x2,serial=mvminput" in argv
    assert argv.index("drive=root") < argv.index("drive=x1")  # the root stays /dev/vda
    assert validate(cfg) == []
    bad = VMConfig(
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        rootfs=tmp_path / "r",
        run_dir=tmp_path,
        extra_disks=((tmp_path / "a,b.img", False, "x y"),),
    )
    assert validate(bad)


class _Stop(Exception):
    pass


def test_build_allow_reaches_the_builders_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[build] allow`` and ``--allow`` become the builder sandbox's allowlist (admission
    then holds them to the host's policy, as for any sandbox)."""
    from mvm.builder import build as B

    (tmp_path / "mvm.toml").write_text(
        '[image]\nname = "app"\n[build]\nrun = ["true"]\nallow = ["files.example:443"]\n'
    )
    jobs: list[B.Job] = []

    def capture(job: B.Job, *args: object) -> None:
        jobs.append(job)
        raise _Stop

    monkeypatch.setattr(B, "_locked_run", capture)
    with pytest.raises(_Stop):
        B.build_project(tmp_path, network_allow=["extra.example"])
    assert (jobs[0].network_preset, jobs[0].network_allow) == (
        "registries",
        ["files.example:443", "extra.example"],
    )
    with pytest.raises(ManifestError, match="host"):
        B.build_project(tmp_path, network_allow=["bad host"])
