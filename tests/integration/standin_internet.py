"""A stand-in internet for tests: a static HTTP server in a private network namespace.

The same construction as the ``internet`` fixture of tests/security/test_network.py (a veth
pair, the server on the namespace side), with the directory and addresses given by the
caller, so a test module can serve its own pages. It is not loopback (which the egress
proxy always refuses); mvmd reaches it through names given in ``MVM_EGRESS_RESOLVE``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mvmd_home import wait_until


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def serve(root: Path, ns_addr: str, host_addr: str, port: int) -> Iterator[str]:
    """Serve ``root`` at ``http://ns_addr:port/`` from a fresh namespace; yields ns_addr."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace test host")
    tag = secrets.token_hex(3)
    ns, veth_h, veth_n = f"mvmt-{tag}", f"mvh{tag}", f"mvn{tag}"
    r = run("ip", "netns", "add", ns)
    if r.returncode != 0:
        pytest.skip(f"ip netns is not possible here: {r.stderr.strip()}")
    server: subprocess.Popen[bytes] | None = None
    try:
        for cmd in (
            ["ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n],
            ["ip", "link", "set", veth_n, "netns", ns],
            ["ip", "addr", "add", f"{host_addr}/24", "dev", veth_h],
            ["ip", "link", "set", veth_h, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/24", "dev", veth_n],
            ["ip", "netns", "exec", ns, "ip", "link", "set", veth_n, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ):
            r = run(*cmd)
            assert r.returncode == 0, f"{cmd}: {r.stderr}"
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", str(port),
             "--bind", ns_addr, "--directory", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        probe = [sys.executable, "-c", f"import urllib.request as u; u.urlopen('http://{ns_addr}:{port}/', timeout=2)"]  # fmt: skip
        assert wait_until(lambda: run(*probe).returncode == 0, 30), "test server did not start"
        yield ns_addr
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        run("ip", "netns", "del", ns)  # removes the veth pair with it
        run("ip", "link", "del", veth_h)
