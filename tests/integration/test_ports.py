"""Port forwards end to end: ``mvmctl`` against a private mvmd and one real VM.

The sandbox ``pf`` (network preset none: no NIC at all) is shared by the module through
the ``sandbox`` fixture: an HTTP server and an echo server run in the guest, and the host
talks to them through forwards relayed over the agent channel. Each test makes (and
removes) the forwards it uses beyond the fixture's, so the tests pass in any order: data,
refusals, ``ls``, a ``kill -9`` of mvmd (the forward works again after the restart), and
``down`` of a sandbox of its own (the host port is closed).

Where a forward listens is read from the kernel's socket table (/proc/net/tcp*), and the
listening socket must be one of mvmd's: the reported ``host`` field alone proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mvm.api import models as M
from mvm.client import Client
from tests.integration.mvmd_home import Ctl, pid_alive, private_home, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmpf-") as h:
        yield h


NAME = "pf"
BIG = 4 * 1024 * 1024
ECHO = r"""
import socket, threading
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
s = socket.create_server(("127.0.0.1", 9000))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.settimeout(60)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
        return bytes(out)


def get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60)


def _addr(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6} (kernel byte order, hex) as text."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listeners(port: int) -> dict[str, int]:
    """The kernel's listening TCP sockets on ``port``: local address -> socket inode."""
    out: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, st, inode = f[1], f[3], int(f[9])
            host, _, p = local.rpartition(":")
            if st == "0A" and int(p, 16) == port:
                out[_addr(host)] = inode
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[len("socket:[") : -1]))
    return out


def assert_listens(ctl: Ctl, port: int, address: str) -> None:
    """mvmd, and only mvmd, listens on exactly ``address:port``."""
    found = listeners(port)
    assert list(found) == [address], f"port {port} listens on {found}, want only {address}"
    assert found[address] in socket_inodes(ctl.daemon_pid()), "not mvmd's listening socket"


def assert_closed(port: int) -> None:
    """Nobody listens on ``port`` any more (bounded wait: removal is asynchronous)."""
    assert wait_until(lambda: listeners(port) == {}, 60), listeners(port)


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    return Ctl(home)


@pytest.fixture(scope="module")
def sandbox(ctl: Ctl, home: Path) -> Iterator[dict[str, object]]:
    """``pf`` with ``-p HTTP:8000``, an http.server on 8000 serving a 4 MiB file, and an
    echo server on 9000."""
    http_port = free_port()
    info = ctl.json("up", "--name", NAME, "--ttl", "30m", "-p", f"{http_port}:8000")
    assert [(f["host"], f["host_port"], f["guest_port"]) for f in info["forwards"]] == [
        ("127.0.0.1", http_port, 8000)
    ]
    assert_listens(ctl, http_port, "127.0.0.1")
    big = os.urandom(BIG)
    ctl.ok("fs", "write", NAME, "/work/big.bin", input=big)
    ctl.ok("fs", "write", NAME, "/work/echo.py", input=ECHO)
    ctl.ok("proc", "start", NAME, "--", "python3", "-m", "http.server", "8000", "-b", "127.0.0.1")
    ctl.ok("proc", "start", NAME, "--", "python3", "/work/echo.py")
    r = ctl.sh(
        NAME,
        "for i in $(seq 300); do python3 -c 'import socket; socket.create_connection"
        '(("127.0.0.1", 8000)).close(); socket.create_connection(("127.0.0.1", 9000))'
        ".close()' 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
    )
    assert r.rc == 0, f"guest servers did not start: {r}"
    yield {"http_port": http_port, "sha": hashlib.sha256(big).hexdigest()}
    ctl("down", NAME)


def test_http_server_through_the_forward(sandbox: dict[str, object]) -> None:
    port = int(str(sandbox["http_port"]))
    resp = get(port, "/big.bin")
    assert resp.status_code == 200
    assert len(resp.content) == BIG
    assert hashlib.sha256(resp.content).hexdigest() == sandbox["sha"]
    assert "big.bin" in get(port, "/").text  # a second connection on the same forward


def test_concurrent_connections_each_get_their_own_bytes(
    ctl: Ctl, sandbox: dict[str, object]
) -> None:
    fwd = ctl.json("forward", NAME, "9000")  # any free host port
    try:
        assert fwd["host"] == "127.0.0.1" and fwd["guest_port"] == 9000 and fwd["host_port"] > 0
        assert_listens(ctl, fwd["host_port"], "127.0.0.1")
        blobs = [bytes([65 + i]) * 150_000 + os.urandom(1000) for i in range(10)]
        results: list[bytes | BaseException | None] = [None] * 10

        def one(i: int) -> None:
            try:
                results[i] = echo(fwd["host_port"], blobs[i])
            except BaseException as exc:
                results[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == blobs
    finally:
        ctl.ok("forward", NAME, "--remove", fwd["id"])
    assert_closed(fwd["host_port"])


def test_upload_round_trip_4mib(ctl: Ctl, sandbox: dict[str, object]) -> None:
    fwd = ctl.json("forward", NAME, "9000")
    try:
        data = os.urandom(BIG)
        got = echo(fwd["host_port"], data)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        ctl.ok("forward", NAME, "--remove", fwd["id"])


def test_nobody_listening_closes_cleanly_and_the_forward_keeps_working(
    ctl: Ctl, sandbox: dict[str, object]
) -> None:
    dead = ctl.json("forward", NAME, "9999")
    assert echo(dead["host_port"], b"anyone?") == b""
    assert echo(dead["host_port"], b"again?") == b""
    assert get(int(str(sandbox["http_port"])), "/").status_code == 200
    gone = ctl.json("forward", NAME, "--remove", dead["id"])
    assert gone["id"] == dead["id"]
    assert_closed(dead["host_port"])
    with pytest.raises(ConnectionRefusedError):
        echo(dead["host_port"], b"x")


def test_wildcard_needs_the_flag(ctl: Ctl, sandbox: dict[str, object], home: Path) -> None:
    port = free_port()
    r = ctl("forward", NAME, f"{port}:8000", "--host", "0.0.0.0")
    assert r.rc == 125 and "wildcard" in r.err and "--allow-wildcard" in r.err, str(r)
    # the flag is not enough: the policy must allow wildcard forwards too
    r = ctl("forward", NAME, f"{port}:8000", "--host", "0.0.0.0", "--allow-wildcard")
    assert r.rc == 125 and "[ports.wildcard]" in r.err, str(r)  # PolicyDenied
    (home / "policy.toml").write_text("allow_wildcard_ports = true\n")
    try:
        fwd = ctl.json("forward", NAME, f"{port}:8000", "--host", "0.0.0.0", "--allow-wildcard")
    finally:
        (home / "policy.toml").unlink()
    assert fwd["host"] == "0.0.0.0" and re.fullmatch(r"\d+-[0-9a-f]{12}", fwd["audit_id"])
    assert_listens(ctl, port, "0.0.0.0")
    assert get(port, "/").status_code == 200
    ctl.ok("forward", NAME, "--remove", fwd["id"])
    assert_closed(port)
    again = ctl("forward", NAME, "--remove", fwd["id"], "--json")
    assert again.rc == 125 and json.loads(again.out)["error"] == "ForwardNotFound", str(again)


def test_port_in_use_is_refused(ctl: Ctl, sandbox: dict[str, object]) -> None:
    port = int(str(sandbox["http_port"]))
    r = ctl("forward", NAME, f"{port}:8000", "--json")
    assert r.rc == 2, str(r)  # InvalidArgument
    err = json.loads(r.out)
    assert err["error"] == "InvalidArgument" and str(port) in err["message"]
    with socket.socket() as s:  # a port someone else holds
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = ctl("forward", NAME, f"{taken}:8000")
        assert r.rc == 2 and f"{taken} is already in use" in r.err, str(r)


def test_bad_guest_port_is_refused(ctl: Ctl, sandbox: dict[str, object]) -> None:
    r = ctl("forward", NAME, "8080:70000")
    assert r.rc == 2 and "1-65535" in r.err, str(r)


def test_ls_shows_forwards(
    ctl: Ctl, sandbox: dict[str, object], home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(str(sandbox["http_port"]))
    fwds = ctl.sandboxes()[NAME]["forwards"]
    assert {(f["host_port"], f["guest_port"]) for f in fwds} >= {(port, 8000)}
    wide = Ctl(home)
    wide.env["COLUMNS"] = "300"  # the table is cut to the terminal width otherwise
    assert f"127.0.0.1:{port}->8000" in wide.ok("ls").out
    monkeypatch.setenv("MVM_HOME", str(home))
    with Client(autostart=False) as c:  # the SDK's calls
        listed = c.forwards(NAME)
        assert any(f.host_port == port for f in listed)
        extra = c.forward(NAME, M.PortSpec(guest_port=8000))
        assert_listens(ctl, extra.host_port, "127.0.0.1")
        assert get(extra.host_port, "/").status_code == 200
        c.unforward(NAME, extra.id)
        assert_closed(extra.host_port)


def test_snapshot_restore_keeps_the_forward(ctl: Ctl, sandbox: dict[str, object]) -> None:
    port = int(str(sandbox["http_port"]))
    ctl.ok("snapshot", "save", NAME, "pf-snap", timeout=300)
    try:
        ctl.ok("snapshot", "restore", NAME, "pf-snap", timeout=300)
    finally:
        ctl("snapshot", "rm", NAME, "pf-snap")
    assert any(f["host_port"] == port for f in ctl.sandboxes()[NAME]["forwards"])
    assert_listens(ctl, port, "127.0.0.1")
    resp = get(port, "/big.bin")  # the restored guest's server, through the new agent
    assert hashlib.sha256(resp.content).hexdigest() == sandbox["sha"]


def test_forward_survives_a_mvmd_kill(ctl: Ctl, sandbox: dict[str, object]) -> None:
    port = int(str(sandbox["http_port"]))
    pid = ctl.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 60)
    with pytest.raises(httpx.TransportError):
        get(port, "/")  # nobody listens while mvmd is down
    ctl.ok("ls")  # starts a new mvmd, which reattaches and binds the forward again
    assert ctl.daemon_pid() != pid
    assert_listens(ctl, port, "127.0.0.1")
    resp = get(port, "/big.bin")
    assert hashlib.sha256(resp.content).hexdigest() == sandbox["sha"]


def test_down_closes_the_host_port(ctl: Ctl) -> None:
    """``down`` of a sandbox of its own (the shared one stays up for the other tests)."""
    port = free_port()
    ctl.json("up", "--name", "pf-down", "--ttl", "10m", "-p", f"{port}:8000")
    try:
        assert_listens(ctl, port, "127.0.0.1")
    finally:
        ctl.ok("down", "pf-down")
    assert_closed(port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as s:  # and it is free for anyone again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
