"""File operations through the guest agent (shared VM), and what does not persist."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mvm.agent import protocol as P
from mvm.agent.client import AgentClient
from mvm.errors import AgentError
from mvm.images.rootfs import sha256_file
from mvm.images.store import Image
from mvm.vm import MicroVM

#: Per test, fixture setup included: a first boot may have to make a boot template
#: (a cold boot under TCG on a loaded 2-core host).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(180), pytest.mark.usefixtures("run_dir_env")]

#: The ``call`` fixture: run a coroutine on the VM loop, bounded.
Call = Callable[..., Any]


def error_code(call: Call, coro: Any) -> str:
    """The AgentError code a request fails with (fails the test if it succeeds)."""
    with pytest.raises(AgentError) as ei:
        call(coro)
    code = ei.value.data["code"]
    assert isinstance(code, str)
    return code


def sh(call: Call, agent: AgentClient, script: str, **kw: Any) -> bytes:
    r = call(agent.exec(["sh", "-c", script], **kw))
    assert r.exit_code == 0, r.stderr
    out: bytes = r.stdout
    return out


# ----------------------------------------------------------------------------- read, write


def test_text_round_trip_and_overwrite(call: Call, agent: AgentClient, gdir: str) -> None:
    path = f"{gdir}/hello.txt"
    text = "h\u00e9llo, w\u00f6rld \u2603\n".encode()
    assert call(agent.write_file(path, text)) == len(text)
    assert call(agent.read_file(path)) == text
    assert sh(call, agent, f"cat {path}") == text  # the unprivileged user sees the same
    call(agent.write_file(path, b"xy"))  # replacing truncates
    assert call(agent.read_file(path)) == b"xy"
    call(agent.write_file(path, b""))
    assert call(agent.read_file(path)) == b""


def test_binary_blob_round_trip(call: Call, agent: AgentClient, gdir: str) -> None:
    blob = os.urandom(5 << 20) + b"\x00\xff" * 7  # several chunks, not a multiple of one
    path = f"{gdir}/blob.bin"
    assert call(agent.write_file(path, blob), timeout=120) == len(blob)
    assert call(agent.read_file(path), timeout=120) == blob
    digest = sh(call, agent, f"sha256sum {path}").split()[0].decode()
    assert digest == hashlib.sha256(blob).hexdigest()
    assert call(agent.stat(path)).size == len(blob)


def test_write_creates_parents_with_owner_and_mode(
    call: Call, agent: AgentClient, gdir: str
) -> None:
    path = f"{gdir}/a/b/c.txt"
    call(agent.write_file(path, b"data", mode=0o600))
    st = call(agent.stat(path))
    assert (st.type, st.size, st.mode, st.uid, st.gid) == ("file", 4, 0o600, 1000, 1000)
    assert call(agent.stat(f"{gdir}/a/b")).uid == 1000
    assert sh(call, agent, f"cat {path}") == b"data"  # readable by its owner, the user
    call(agent.write_file(f"{gdir}/root-only", b"secret", mode=0o600, owner="root"))
    assert call(agent.stat(f"{gdir}/root-only")).uid == 0
    r = call(agent.exec(["cat", f"{gdir}/root-only"]))
    assert (r.exit_code, r.stdout) == (1, b"")  # cat: Permission denied


def test_read_limit(call: Call, agent: AgentClient, gdir: str) -> None:
    path = f"{gdir}/ten-k"
    call(agent.write_file(path, b"z" * 10240))
    assert error_code(call, agent.read_file(path, limit=100)) == P.E_TOO_LARGE
    assert call(agent.read_file(path, limit=10240)) == b"z" * 10240


# ----------------------------------------------------------------------------- directories


def test_list_dir_entries(call: Call, agent: AgentClient, gdir: str) -> None:
    call(agent.write_file(f"{gdir}/a.txt", b"abc", mode=0o640))
    call(agent.mkdir(f"{gdir}/sub"))
    sh(call, agent, f"ln -s a.txt {gdir}/link")
    entries = call(agent.list_dir(gdir))
    assert [e.name for e in entries] == ["a.txt", "link", "sub"]
    by = {e.name: e for e in entries}
    assert (by["a.txt"].type, by["a.txt"].size, by["a.txt"].mode) == ("file", 3, 0o640)
    assert by["a.txt"].uid == 1000
    assert by["sub"].type == "dir"
    assert by["link"].type == "symlink"
    assert call(agent.list_dir(f"{gdir}/sub")) == []


def test_stat(call: Call, agent: AgentClient) -> None:
    st = call(agent.stat("/etc/os-release"))
    assert st.type in ("file", "symlink")
    st = call(agent.stat("/work"))
    assert st.type == "dir" and st.uid == 1000
    assert call(agent.stat("/dev/null")).type == "other"


def test_mkdir(call: Call, agent: AgentClient, gdir: str) -> None:
    call(agent.mkdir(f"{gdir}/x/y/z", parents=True))
    assert call(agent.stat(f"{gdir}/x/y/z")).type == "dir"
    call(agent.mkdir(f"{gdir}/x/y/z", parents=True))  # exists: fine with parents
    assert error_code(call, agent.mkdir(f"{gdir}/x/y/z")) == P.E_EXISTS
    assert error_code(call, agent.mkdir(f"{gdir}/no/such/parent")) == P.E_NOT_FOUND


def test_move(call: Call, agent: AgentClient, gdir: str) -> None:
    call(agent.write_file(f"{gdir}/src.txt", b"moved"))
    call(agent.mkdir(f"{gdir}/dest"))
    call(agent.move(f"{gdir}/src.txt", f"{gdir}/dest/renamed.txt"))
    assert call(agent.read_file(f"{gdir}/dest/renamed.txt")) == b"moved"
    assert error_code(call, agent.stat(f"{gdir}/src.txt")) == P.E_NOT_FOUND
    call(agent.move(f"{gdir}/dest", f"{gdir}/dest2"))  # directories too
    assert call(agent.read_file(f"{gdir}/dest2/renamed.txt")) == b"moved"
    assert error_code(call, agent.move(f"{gdir}/nope", f"{gdir}/x")) == P.E_NOT_FOUND


def test_remove(call: Call, agent: AgentClient, gdir: str) -> None:
    call(agent.write_file(f"{gdir}/f", b"1"))
    call(agent.remove(f"{gdir}/f"))
    assert error_code(call, agent.stat(f"{gdir}/f")) == P.E_NOT_FOUND
    call(agent.mkdir(f"{gdir}/empty"))
    call(agent.remove(f"{gdir}/empty"))
    call(agent.write_file(f"{gdir}/full/deep/er/file", b"1"))
    assert error_code(call, agent.remove(f"{gdir}/full")) == P.E_NOT_EMPTY
    assert call(agent.read_file(f"{gdir}/full/deep/er/file")) == b"1"  # untouched
    call(agent.remove(f"{gdir}/full", recursive=True))
    assert error_code(call, agent.stat(f"{gdir}/full")) == P.E_NOT_FOUND
    assert error_code(call, agent.remove(f"{gdir}/never-was")) == P.E_NOT_FOUND


# ----------------------------------------------------------------------------- errors


def test_error_codes(call: Call, agent: AgentClient, gdir: str) -> None:
    call(agent.write_file(f"{gdir}/file", b"x"))
    assert error_code(call, agent.read_file(f"{gdir}/missing")) == P.E_NOT_FOUND
    assert error_code(call, agent.read_file(gdir)) == P.E_IS_DIR
    assert error_code(call, agent.list_dir(f"{gdir}/file")) == P.E_NOT_DIR
    assert error_code(call, agent.list_dir(f"{gdir}/missing")) == P.E_NOT_FOUND
    assert error_code(call, agent.write_file(f"{gdir}/file/below", b"x")) == P.E_NOT_DIR
    assert error_code(call, agent.write_file(gdir, b"x")) == P.E_IS_DIR
    assert error_code(call, agent.read_file("relative/path")) == P.E_BAD_REQUEST
    assert error_code(call, agent.read_file("/dev/zero")) == P.E_BAD_REQUEST  # not regular
    assert error_code(call, agent.remove("/", recursive=True)) == P.E_PERMISSION
    assert call(agent.stat("/etc/passwd")).type == "file"  # `/` was left alone
    # a failed request does not disturb the connection
    call(agent.ping())


def test_full_overlay_is_no_space(call: Call, agent: AgentClient, gdir: str) -> None:
    r = call(agent.exec(["sh", "-c", f"head -c 2000M /dev/zero > {gdir}/fill"], timeout=60))
    assert r.exit_code == 1 and b"No space left" in r.stderr, r
    try:
        assert error_code(call, agent.write_file(f"{gdir}/more", b"y" * (2 << 20))) == P.E_NO_SPACE
    finally:
        call(agent.remove(f"{gdir}/fill"))
    call(agent.write_file(f"{gdir}/more", b"y" * (2 << 20)))  # room again


# ----------------------------------------------------------------------------- persistence


def test_writes_land_in_the_overlay_not_the_image(
    call: Call, agent: AgentClient, boot_vm: Callable[..., MicroVM], image: Image, gdir: str
) -> None:
    """The root filesystem is read-only underneath: root can write anywhere, but the
    writes live in the VM's memory. A fresh VM sees none of them; the image is unchanged."""
    marker = f"/etc/it-marker-{os.urandom(4).hex()}"
    call(agent.write_file(marker, b"overlay", owner="root"))
    call(agent.write_file(f"{gdir}/work-file", b"work"))
    sh(call, agent, "echo changed >> /etc/hostname", user="root")
    assert sh(call, agent, f"cat {marker}") == b"overlay"

    fresh = boot_vm().require_agent()
    assert error_code(call, fresh.stat(marker)) == P.E_NOT_FOUND
    assert error_code(call, fresh.stat(gdir)) == P.E_NOT_FOUND
    assert b"changed" not in call(fresh.read_file("/etc/hostname"))
    assert call(agent.read_file(marker)) == b"overlay"  # still there in the first VM

    rootfs = Path(image.rootfs)
    assert rootfs.stat().st_mode & 0o222 == 0, "the image file is writable on the host"
    assert sha256_file(rootfs) == image.rootfs_sha256
