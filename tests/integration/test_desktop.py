"""Desktop sandboxes on real VMs: input through xdotool, screenshots decoded and compared by
pixel region (no golden image), the VNC server asking for a password, noVNC on the forward.

The ``desktop`` image is built here if missing (a build failure fails the tests). One
private mvmd and one desktop sandbox shared by the module (the X start is in the template).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mvm import paths
from mvm.errors import InvalidArgument
from mvm.images.store import ImageStore
from tests.integration import png
from tests.integration.mvmd_home import private_home, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "desktop.md"
#: An xterm whose title stays what -T says (bash would retitle it "user@mvm: /work").
XTERM = ["xterm", "-xrm", "XTerm*allowTitleOps: false"]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    source = paths.home()
    ImageStore(source).ensure("desktop")  # built here on a fresh machine; failing fails
    saved = {k: os.environ.get(k) for k in ("MVM_HOME", "MVM_RUN_DIR")}
    with private_home("mvmdt-", source=source) as h:
        os.environ["MVM_HOME"] = str(h)
        os.environ.pop("MVM_RUN_DIR", None)
        try:
            yield h
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def desk(home: Path) -> Iterator[Any]:
    import mvm

    with mvm.DesktopSandbox.create(name="dt-one") as d:
        yield d


@pytest.fixture(scope="module")
def wide(home: Path) -> Iterator[Any]:
    """A second desktop at another resolution: from the same warm template, resized."""
    import mvm

    with mvm.DesktopSandbox.create(resolution=(1280, 800), name="dt-wide") as d:
        yield d


def vnc_des_key(password: str) -> bytes:
    """VNC authentication's DES key: the password (8 bytes, NUL-padded), each byte's bits
    reversed (RFC 6143 7.2.2, as every VNC server implements it)."""
    raw = password.encode()[:8].ljust(8, b"\0")
    return bytes(int(f"{b:08b}"[::-1], 2) for b in raw)


def vnc_screen_size(port: int, password: str) -> tuple[int, int]:
    """RFB 3.8 handshake with VNC authentication, then ServerInit's framebuffer size."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    def recv(s: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            assert chunk, "VNC server closed the connection"
            buf += chunk
        return buf

    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.settimeout(60)
        assert recv(s, 12).startswith(b"RFB 003.")
        s.sendall(b"RFB 003.008\n")
        types = recv(s, recv(s, 1)[0])
        assert 2 in types, types
        s.sendall(b"\x02")
        challenge = recv(s, 16)
        enc = Cipher(TripleDES(vnc_des_key(password) * 3), modes.ECB()).encryptor()  # = DES
        s.sendall(enc.update(challenge) + enc.finalize())
        assert struct.unpack(">I", recv(s, 4))[0] == 0, "VNC authentication failed"
        s.sendall(b"\x01")  # ClientInit: shared
        w, h = struct.unpack(">HH", recv(s, 4))
        return w, h


def geometry(desk: Any, title: str) -> tuple[int, int]:
    out = desk.commands.run(
        ["xdotool", "search", "--name", f"^{title}$", "getwindowgeometry", "--shell"],
        env={"DISPLAY": ":0"},
        timeout_seconds=60,
    ).stdout
    vals = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return int(vals["X"]), int(vals["Y"])


def active_title(desk: Any) -> str:
    r = desk.commands.run(
        ["xdotool", "getactivewindow", "getwindowname"], env={"DISPLAY": ":0"}, timeout_seconds=60
    )
    return r.stdout.strip()


def test_screen_and_screenshot(desk: Any) -> None:
    assert desk.get_screen_size() == (1024, 768)
    assert png.size(desk.screenshot()) == (1024, 768)


def test_typing_shows_where_the_text_went(desk: Any) -> None:
    desk.launch([*XTERM, "-T", "typing", "-geometry", "60x10+0+0"])
    desk.wait_window("typing")
    desk.left_click(100, 60)
    assert wait_until(lambda: active_title(desk) == "typing", 60)
    before = png.decode(desk.screenshot())
    desk.write("hello desktop")
    desk.press("Return")
    after = png.decode(desk.screenshot())
    assert before.region(0, 0, 360, 150) != after.region(0, 0, 360, 150)  # the terminal
    assert before.region(700, 500, 1024, 768) == after.region(700, 500, 1024, 768)  # elsewhere


def test_click_focuses_drag_moves_scroll_scrolls(desk: Any) -> None:
    desk.launch([*XTERM, "-T", "left", "-geometry", "40x10+500+100", "-e", "seq 1 300; sleep 3600"])
    desk.launch([*XTERM, "-T", "right", "-geometry", "40x10+500+400"])
    desk.wait_window("left")
    desk.wait_window("right")
    desk.left_click(600, 450)
    assert wait_until(lambda: active_title(desk) == "right", 60)
    desk.left_click(600, 150)
    assert wait_until(lambda: active_title(desk) == "left", 60)
    # scroll: the wheel over the "left" terminal shows earlier lines of its scrollback
    box = (500, 100, 740, 230)
    before = png.decode(desk.screenshot()).region(*box)
    desk.move_mouse(600, 150)
    desk.scroll("up", 5)
    # xterm repaints when it gets to it (TCG): poll the screen, bounded, for the change
    assert wait_until(lambda: png.decode(desk.screenshot()).region(*box) != before, 60)
    # drag: pressing, moving and releasing over the terminal's text selects (highlights) it
    box = (500, 100, 740, 170)
    before = png.decode(desk.screenshot()).region(*box)
    desk.drag((505, 105), (720, 160))
    assert wait_until(lambda: png.decode(desk.screenshot()).region(*box) != before, 60)


def test_invalid_input_is_refused(desk: Any) -> None:
    with pytest.raises(InvalidArgument, match="off the 1024x768 screen"):
        desk.left_click(5000, 10)
    with pytest.raises(InvalidArgument):
        desk.move_mouse(-1, 0)
    with pytest.raises(InvalidArgument):
        desk.write("x" * 5000)
    with pytest.raises(InvalidArgument):
        desk.write("bell\x07")
    with pytest.raises(InvalidArgument):
        desk.press("ctrl+c; rm -rf /")


def test_vnc_needs_a_password_and_novnc_is_served(desk: Any) -> None:
    fwd = desk.ports.forward(5900)
    try:
        with socket.create_connection(("127.0.0.1", fwd.host_port), timeout=60) as s:
            s.settimeout(60)
            version = s.recv(12)
            assert re.fullmatch(rb"RFB 003\.00\d\n", version), version
            s.sendall(b"RFB 003.008\n")
            n = s.recv(1)[0]
            types = s.recv(n)
            assert n > 0 and 2 in types and 1 not in types, types  # VNC auth, never "None"
    finally:
        fwd.close()
    url = desk.stream.start()
    assert url.startswith("http://127.0.0.1:") and "password=" in url
    assert desk.stream.password and len(desk.stream.password) == 8
    page = httpx.get(url.split("?", 1)[0], timeout=60)
    assert page.status_code == 200 and "noVNC" in page.text
    desk.stream.stop()


def test_docs_example_runs(home: Path) -> None:
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert code is not None
    r = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "screen 1024 768 changed True" in r.stdout


def test_clipboard_round_trip_audited_by_hash_only(desk: Any, home: Path) -> None:
    text = "mvm clipboard: héllo ✓\nsecond line " + os.urandom(6).hex()
    desk.clipboard.write(text)
    assert desk.clipboard.read() == text
    # a program in the guest sees it too (xclip is what an app's paste would ask)
    r = desk.commands.run(
        ["xclip", "-selection", "clipboard", "-o"], env={"DISPLAY": ":0"}, timeout_seconds=60
    )
    assert r.stdout == text
    desk.clipboard.write("replaced")
    assert desk.clipboard.read() == "replaced"
    log = "".join(f.read_text() for f in (home / "audit").glob("*.jsonl"))
    assert text.splitlines()[-1] not in log and json.dumps(text)[1:-1] not in log
    with pytest.raises(InvalidArgument):
        desk.clipboard.write("x" * (2 << 20))


def test_another_resolution_from_the_same_template(wide: Any) -> None:
    assert wide.get_screen_size() == (1280, 800)
    shot = png.decode(wide.screenshot())
    assert (shot.width, shot.height) == (1280, 800)
    wide.move_mouse(1270, 790)  # off a 1024x768 screen, on this one
    assert wide.get_cursor_position() == (1270, 790)
    with pytest.raises(InvalidArgument, match="off the 1280x800 screen"):
        wide.left_click(1280, 10)
    # the viewer follows the change: x11vnc's framebuffer is the new size
    wide.stream.start()
    fwd = wide.ports.forward(5900)
    try:
        assert vnc_screen_size(fwd.host_port, wide.stream.password) == (1280, 800)
    finally:
        fwd.close()
        wide.stream.stop()
    wide.set_resolution((800, 600))
    assert png.size(wide.screenshot()) == (800, 600)


def test_resolutions_outside_the_range_are_refused(home: Path) -> None:
    import mvm

    for bad in ((4096, 768), (100, 100), (1024,), "1024x768", (1024.0, 768)):
        with pytest.raises(InvalidArgument):
            mvm.DesktopSandbox.create(resolution=bad, name="dt-bad")  # type: ignore[arg-type]
