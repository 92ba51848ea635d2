"""Boot artefacts built on the host: the newc initramfs writer and the bzImage payload cutter."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm.errors import ImageBuildError
from mvm.images import initramfs as I
from mvm.images.kernel import Kernel, decompress_payload, extract_payload

# --------------------------------------------------------------------------- newc reader

NEWC_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)  # fmt: skip


def read_newc(data: bytes) -> list[tuple[str, dict[str, int], bytes]]:
    """An independent newc parser that also checks magic, hex fields and 4-byte alignment."""
    out = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at unaligned offset {pos}"
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        raw = data[pos + 6 : pos + 110]
        assert len(raw) == 104 and all(c in b"0123456789ABCDEF" for c in raw)
        fields = {k: int(raw[i * 8 : i * 8 + 8], 16) for i, k in enumerate(NEWC_FIELDS)}
        name_end = pos + 110 + fields["namesize"]
        name_raw = data[pos + 110 : name_end]
        assert name_raw.endswith(b"\0") and b"\0" not in name_raw[:-1]
        name = name_raw[:-1].decode()
        body = name_end + (-name_end % 4)
        assert data[name_end:body] == b"\0" * (body - name_end)
        end = body + fields["filesize"]
        content = data[body:end]
        assert len(content) == fields["filesize"]
        pos = end + (-end % 4)
        assert data[end:pos] == b"\0" * (pos - end)
        out.append((name, fields, content))
        if name == "TRAILER!!!":
            assert pos == len(data), "bytes after the trailer"
            return out


SAMPLE = [
    I.Entry("bin", stat.S_IFDIR | 0o755),
    I.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    I.Entry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
    I.Entry("a", stat.S_IFREG | 0o644, b""),
    I.Entry("ab", stat.S_IFREG | 0o644, b"x"),
    I.Entry("abc", stat.S_IFREG | 0o644, b"xy"),
    I.Entry("mvm/agent.py", stat.S_IFREG | 0o644, bytes(range(256)) * 3),
    I.Entry("lib/ü-name", stat.S_IFREG | 0o600, b"\0\1\2"),
]


def test_newc_parses_back() -> None:
    """Names, modes, sizes, data, rdev and the trailer come back exactly."""
    entries = read_newc(I.newc(SAMPLE))
    assert [n for n, _, _ in entries] == [e.path for e in SAMPLE] + ["TRAILER!!!"]
    for e, (_, f, data) in zip(SAMPLE, entries, strict=False):
        assert f["mode"] == e.mode
        assert data == e.data
        assert (f["rdevmajor"], f["rdevminor"]) == e.rdev
        assert (f["uid"], f["gid"], f["mtime"]) == (0, 0, 0)
        assert f["nlink"] == (2 if stat.S_ISDIR(e.mode) else 1)
    inos = [f["ino"] for _, f, _ in entries]
    assert len(set(inos)) == len(inos)
    assert entries[-1][1]["filesize"] == 0


def test_newc_empty_archive() -> None:
    data = I.newc([])
    assert [n for n, _, _ in read_newc(data)] == ["TRAILER!!!"]
    assert len(data) % 4 == 0


def test_newc_deterministic() -> None:
    """Equal input -> byte-equal output (the archive is cached under its hash)."""
    assert I.newc(SAMPLE) == I.newc(list(SAMPLE))
    assert I.newc(SAMPLE) != I.newc(SAMPLE[:-1])


@given(
    st.lists(
        st.tuples(
            st.text(
                alphabet=st.characters(blacklist_characters="\0/", blacklist_categories=["Cs"]),
                min_size=1,
                max_size=20,
            ),
            st.binary(max_size=50),
            st.sampled_from([0o644, 0o755, 0o600]),
        ),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
@settings(max_examples=150)
def test_newc_round_trip_property(files: list[tuple[str, bytes, int]]) -> None:
    """Any names (UTF-8) and any sizes keep alignment and round-trip."""
    entries = [I.Entry(n, stat.S_IFREG | m, d) for n, d, m in files]
    parsed = read_newc(I.newc(entries))
    assert [(n, f["mode"], d) for n, f, d in parsed[:-1]] == [
        (e.path, e.mode, e.data) for e in entries
    ]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_newc_readable_by_cpio(tmp_path: Path) -> None:
    """GNU cpio lists and extracts the archive with the same names and contents."""
    archive = tmp_path / "a.cpio"
    archive.write_bytes(I.newc([e for e in SAMPLE if not stat.S_ISCHR(e.mode)]))
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=archive.open("rb"), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split("\n")[:-1] == [e.path for e in SAMPLE if not stat.S_ISCHR(e.mode)]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        stdin=archive.open("rb"),
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert (out / "mvm" / "agent.py").read_bytes() == bytes(range(256)) * 3
    assert (out / "lib" / "ü-name").read_bytes() == b"\0\1\2"


def test_agent_sources_shipped() -> None:
    """The initramfs carries the agent and the protocol module it imports."""
    src = I.agent_sources()
    assert set(src) == {*I.GUEST_MODULES, "protocol.py"}
    assert b"import protocol as P" in src["agent.py"]
    assert b"class FrameDecoder" in src["protocol.py"]
    assert I.init_script().startswith(b"#!")


def test_shipped_agent_imports_only_what_is_shipped(tmp_path: Path) -> None:
    """The shipped files alone, as the guest runs them (``python3 -I``, outside the
    package): the agent imports, and every module of its own comes from beside it."""
    for name, data in I.agent_sources().items():
        (tmp_path / name).write_bytes(data)
    probe = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import agent; "
        "print(json.dumps(sorted(n for n, m in sys.modules.items() "
        "if getattr(m, '__file__', None) and m.__file__.startswith(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    shipped = {n.removesuffix(".py") for n in I.agent_sources()}
    assert set(json.loads(out)) == shipped
    assert not any(n.startswith("mvm") for n in json.loads(out))


def test_entries_for_fake_kernel(tmp_path: Path) -> None:
    """The initramfs layout: /init, busybox, /dev/console, modules in order, the agent."""
    mods = tmp_path / "modules"
    mods.mkdir()
    (mods / "order").write_text("virtio\nvirtio_blk\n")
    (mods / "virtio.ko").write_bytes(b"V")
    (mods / "virtio_blk.ko").write_bytes(b"B")
    kernel = Kernel("linux-image-x", "1", "6.1.0-x", tmp_path)
    es = I.entries_for(kernel, b"BUSYBOX")
    by_path = {e.path: e for e in es}
    assert by_path["bin/busybox"].data == b"BUSYBOX"
    assert by_path["init"].mode == stat.S_IFREG | 0o755
    assert by_path["dev/console"].rdev == (5, 1)
    assert stat.S_ISCHR(by_path["dev/console"].mode)
    assert by_path["lib/modules/virtio_blk.ko"].data == b"B"
    assert by_path["lib/modules/order"].data == b"virtio\nvirtio_blk\n"
    assert by_path["mvm/agent.py"].data == I.agent_sources()["agent.py"]
    # Directories come before their contents.
    paths = [e.path for e in es]
    for p in paths:
        parent = p.rpartition("/")[0]
        if parent:
            assert paths.index(parent) < paths.index(p)
    read_newc(I.newc(es))


# --------------------------------------------------------------------------- bzImage

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40


def bzimage(payload: bytes, setup_sects: int = 4, *, pad_after: int = 16) -> bytes:
    """A synthetic bzImage: boot sector + setup sectors with a setup header, then the payload."""
    setup = bytearray((max(setup_sects, 0) or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)  # boot protocol 2.15
    offset = 0x100  # payload_offset is relative to the protected-mode code
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\xcc" * offset + payload + b"\x90" * pad_after


def size_appended(compressed: bytes, raw: bytes) -> bytes:
    """What the kernel build does for most codecs: the u32 LE uncompressed size at the end."""
    return compressed + struct.pack("<I", len(raw))


@pytest.mark.parametrize("setup_sects", [4, 27, 0])
def test_extract_payload(setup_sects: int) -> None:
    """The payload is found from setup_sects (0 means 4) and payload_offset/length."""
    payload = gzip.compress(ELF)
    img = bzimage(payload, setup_sects)
    assert extract_payload(img) == payload


def test_gzip_payload(tmp_path: Path) -> None:
    out = decompress_payload(extract_payload(bzimage(gzip.compress(ELF))), tmp_path)
    assert out == ELF


def test_xz_payload_with_size_trailer(tmp_path: Path) -> None:
    """xz payloads carry the kernel's 4-byte size trailer; it must not break decoding."""
    payload = size_appended(lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), ELF)
    assert decompress_payload(extract_payload(bzimage(payload)), tmp_path) == ELF


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 not installed")
def test_lz4_legacy_payload_with_size_trailer(tmp_path: Path) -> None:
    """The Debian case: a legacy-frame LZ4 payload plus the size trailer."""
    raw = tmp_path / "raw"
    raw.write_bytes(ELF)
    subprocess.run(["lz4", "-l", "-q", "-f", str(raw), str(tmp_path / "raw.lz4")], check=True)
    payload = size_appended((tmp_path / "raw.lz4").read_bytes(), ELF)
    work = tmp_path / "work"
    work.mkdir()
    assert decompress_payload(extract_payload(bzimage(payload)), work) == ELF


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_zstd_payload_with_size_trailer(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(ELF)
    subprocess.run(["zstd", "-q", "-f", str(raw), "-o", str(tmp_path / "raw.zst")], check=True)
    payload = size_appended((tmp_path / "raw.zst").read_bytes(), ELF)
    work = tmp_path / "work"
    work.mkdir()
    assert decompress_payload(extract_payload(bzimage(payload)), work) == ELF


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        (b"", "not a bzImage"),
        (b"\0" * 0x25F, "not a bzImage"),
        (bytes(0x1000), "not a bzImage"),  # no HdrS
        (bzimage(b"")[: 5 * 512], "invalid payload"),  # zero length
        (bzimage(b"x" * 100, pad_after=0)[:-1], "invalid payload"),  # runs past the end
    ],
    ids=["empty", "short", "no-HdrS", "zero-length", "truncated"],
)
def test_extract_payload_rejects(image: bytes, needle: str) -> None:
    with pytest.raises(ImageBuildError, match=needle):
        extract_payload(image)


def test_extract_payload_rejects_huge_length() -> None:
    img = bytearray(bzimage(b"abc"))
    struct.pack_into("<I", img, 0x24C, 0xFFFFFFFF)
    with pytest.raises(ImageBuildError, match="invalid payload"):
        extract_payload(bytes(img))


def test_unknown_codec(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown kernel compression"):
        decompress_payload(b"BZh91AY&SY" + b"\0" * 20, tmp_path)


def test_decompressed_not_elf(tmp_path: Path) -> None:
    """A payload that decompresses to something other than an ELF file is refused."""
    with pytest.raises(ImageBuildError, match="not an ELF"):
        decompress_payload(gzip.compress(b"MZ this is a PE file"), tmp_path)
    with pytest.raises(ImageBuildError, match="not an ELF"):
        decompress_payload(lzma.compress(b"", format=lzma.FORMAT_XZ), tmp_path)


@pytest.mark.parametrize("codec", ["gzip", "xz"])
def test_corrupt_payload_is_image_build_error(codec: str, tmp_path: Path) -> None:
    whole = gzip.compress(ELF) if codec == "gzip" else lzma.compress(ELF, format=lzma.FORMAT_XZ)
    with pytest.raises(ImageBuildError):
        decompress_payload(whole[: len(whole) // 2], tmp_path)
