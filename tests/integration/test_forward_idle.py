"""A forwarded connection that goes quiet is closed by mvmd (one real VM).

The module's private mvmd runs with ``MVM_FORWARD_IDLE_TIMEOUT=3s``; the guest runs an
echo server. A connection that echoed once and then stays silent must see EOF from the
host side (bounded wait), the guest-side relay must end, and the forward must keep serving.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.integration.mvmd_home import Ctl, private_home

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

NAME = "idle"
ECHO = r"""
import socket, threading
def serve(c):
    with c:
        while (d := c.recv(65536)):
            c.sendall(d)
s = socket.create_server(("127.0.0.1", 9000))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def ctl() -> Iterator[Ctl]:
    with private_home("mvmfi-") as home:
        c = Ctl(home)
        c.env["MVM_FORWARD_IDLE_TIMEOUT"] = "3s"  # read by the mvmd this module starts
        yield c


@pytest.fixture(scope="module")
def port(ctl: Ctl) -> Iterator[int]:
    ctl.json("up", "--name", NAME, "--ttl", "30m")
    ctl.ok("fs", "write", NAME, "/work/echo.py", input=ECHO)
    ctl.ok("proc", "start", NAME, "--", "python3", "/work/echo.py")
    r = ctl.sh(
        NAME,
        "for i in $(seq 300); do python3 -c 'import socket; socket.create_connection"
        '(("127.0.0.1", 9000)).close()\' 2>/dev/null && exit 0; sleep 0.1; done; exit 1',
    )
    assert r.rc == 0, f"guest echo server did not start: {r}"
    fwd = ctl.json("forward", NAME, "9000")
    yield int(fwd["host_port"])
    ctl("down", NAME)


def test_a_silent_connection_is_closed_and_the_forward_keeps_serving(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        # Nothing more either way: mvmd closes it after the idle timeout (3 s). The
        # 120 s socket timeout is the bound; without the idle timeout recv never returns.
        assert s.recv(65536) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"again")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        assert got == b"again"
