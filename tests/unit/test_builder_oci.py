"""OCI/docker-save reading and layer unpacking (the code the builder VM runs), on a temp dir."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.builder import oci
from tests.ocitools import Layer, Member, write_docker_save, write_oci

CONFIG = {"Env": ["PATH=/bin", "A=b=c"], "WorkingDir": "/w", "User": "1000", "Cmd": ["cat", "/m"]}


def good_layers() -> list[Layer]:
    return [
        Layer(
            [
                Member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
                Member("etc/gone", b"x"),
                Member("opq/", kind=tarfile.DIRTYPE, mode=0o755),
                Member("opq/old", b"old"),
                Member("marker", b"hello\n"),
                Member("home/u/own", b"mine", uid=os.getuid() or 1234, gid=os.getgid() or 1234),
            ]
        ),
        Layer(
            [
                Member("etc/.wh.gone"),
                Member("opq/.wh..wh..opq"),
                Member("opq/new", b"new"),
                Member("link", kind=tarfile.SYMTYPE, link="marker"),
                Member("abs", kind=tarfile.SYMTYPE, link="/etc"),  # a link itself is fine
                Member("hard", kind=tarfile.LNKTYPE, link="marker"),
            ]
        ),
    ]


@pytest.mark.parametrize("fmt", ["oci", "oci-plain", "docker"])
def test_import_applies_whiteouts_and_keeps_config(tmp_path: Path, fmt: str) -> None:
    arch = tmp_path / "img.tar"
    if fmt == "docker":
        write_docker_save(arch, good_layers(), CONFIG)
    else:
        write_oci(arch, good_layers(), CONFIG, gz=fmt == "oci")
    root = tmp_path / "root"
    root.mkdir()
    with arch.open("rb") as f:
        cfg = oci.import_archive(f, str(root))
    assert cfg.env == {"PATH": "/bin", "A": "b=c"}
    assert (cfg.workdir, cfg.user, cfg.cmd) == ("/w", "1000", ["cat", "/m"])
    assert (root / "marker").read_bytes() == b"hello\n"
    assert not (root / "etc/gone").exists() and (root / "etc").is_dir()
    assert sorted(os.listdir(root / "opq")) == ["new"]
    assert os.readlink(root / "link") == "marker" and os.readlink(root / "abs") == "/etc"
    assert os.stat(root / "hard").st_ino == os.stat(root / "marker").st_ino
    assert os.stat(root / "marker").st_mtime == 1_600_000_000


HOSTILE = {
    "dotdot": ([Layer([Member("../../etc/x", b"pwn")])], "'..'"),
    "absolute": ([Layer([Member("/etc/x", b"pwn")])], "absolute"),
    "device": ([Layer([Member("dev/mem", kind=tarfile.CHRTYPE)])], "device"),
    "fifo": ([Layer([Member("f", kind=tarfile.FIFOTYPE)])], "FIFO"),
    "symlink-escape": (
        [
            Layer([Member("esc", kind=tarfile.SYMTYPE, link="/")]),
            Layer([Member("esc/etc/x", b"pwn")]),
        ],
        "through the link",
    ),
    "relative-link-escape": (
        [
            Layer([Member("d", kind=tarfile.SYMTYPE, link="../../../../")]),
            Layer([Member("d/x", b"p")]),
        ],
        "through the link",
    ),
    "hardlink-out": ([Layer([Member("h", kind=tarfile.LNKTYPE, link="../../etc/passwd")])], "'..'"),
    "hardlink-missing": (
        [Layer([Member("h", kind=tarfile.LNKTYPE, link="etc/passwd")])],
        "hard link",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_refused(tmp_path: Path, case: str) -> None:
    layers, words = HOSTILE[case]
    arch = write_oci(tmp_path / "bad.tar", layers, {})
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "etc"
    with arch.open("rb") as f, pytest.raises(oci.OciError) as info:
        oci.import_archive(f, str(root))
    assert words in str(info.value)
    assert "layer " in str(info.value)
    assert not outside.exists()


def test_size_limit(tmp_path: Path) -> None:
    arch = write_oci(tmp_path / "big.tar", [Layer([Member("a", b"x" * 5000)])], {})
    root = tmp_path / "root"
    root.mkdir()
    with arch.open("rb") as f, pytest.raises(oci.OciError, match="larger than"):
        oci.import_archive(f, str(root), max_bytes=4096)


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "x.tar"
    with tarfile.open(p, "w") as tar:
        tar.add(__file__, arcname="hello.py")
    with p.open("rb") as f, pytest.raises(oci.OciError, match="neither an OCI"):
        oci.import_archive(f, str(tmp_path))


def test_member_path() -> None:
    assert oci.member_path("./a//b/") == "a/b"
    for bad in ("/a", "a/../../b", "..", "a\0b"):
        with pytest.raises(oci.OciError):
            oci.member_path(bad)


_PART = st.sampled_from(["a", "b", "..", ".", "", "etc", ".wh.a", ".wh..wh..opq"])
_NAME = st.lists(_PART, min_size=1, max_size=4).map("/".join)
_MEMBER = st.builds(
    Member,
    name=_NAME,
    data=st.just(b"x"),
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    link=st.sampled_from(["/", "..", "../..", "a", "/etc", "b/a"]),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(_MEMBER, max_size=6).map(Layer), min_size=1, max_size=3))
def test_random_layers_never_write_outside_the_root(tmp_path: Path, layers: list[Layer]) -> None:
    """Whatever the members, the import succeeds or refuses; nothing lands outside root."""
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    arch = write_oci(case / "x.tar", layers, {}, gz=False)
    root = case / "sub" / "root"
    root.mkdir(parents=True)
    with arch.open("rb") as f:
        try:
            oci.import_archive(f, str(root))
        except oci.OciError:
            pass
    assert sorted(os.listdir(case)) == ["sub", "x.tar"]
    assert os.listdir(case / "sub") == ["root"]
