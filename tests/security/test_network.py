"""Network egress from real sandboxes: the only way out is mvmd's egress proxy, and it
allows by name and port, refuses everything else, and audits every decision.

"The internet" is a Python HTTP server in a network namespace of this machine
(198.51.100.2 on a veth pair; the host side is 198.51.100.1): not loopback, which is
always refused. Names are given to mvmd with its resolver override
``MVM_EGRESS_RESOLVE``, so no DNS is involved. A loopback HTTP server on the host
stands for "the host's own services" that a rebinding name tries to reach.

Sandboxes (one private mvmd; made by the ``sandboxes`` fixture and shared by the module,
so the tests pass in any order; each test leaves them running):
- ``net-allow``: ``--network-allow allowed.test:8080``
- ``net-open``:  ``--network-preset unrestricted``
- ``net-none``:  the default (no network)
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import standin_internet

# The private-mvmd fixture `home` is shared with test_daemon; tests take it as a parameter.
from tests.integration.mvmd_home import Ctl, private_home, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmnet-") as h:
        yield h


NS_ADDR = "198.51.100.2"
HOST_ADDR = "198.51.100.1"
PORT = 8080
TOKEN = "mvm-egress-" + secrets.token_hex(8)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An HTTP server at 198.51.100.2:8080 in a private network namespace."""
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text(TOKEN + "\n")
    with standin_internet.serve(root, NS_ADDR, HOST_ADDR, PORT) as addr:
        yield addr


@pytest.fixture(scope="module")
def loopback_service() -> Iterator[int]:
    """A host-only HTTP service on 127.0.0.1 that no sandbox may reach."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"HOST-LOOPBACK-SECRET\n")

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def ctl(home: Path, internet: str, loopback_service: int) -> Ctl:
    c = Ctl(home)
    c.env["COLUMNS"] = "250"  # `ls` tables unabridged
    c.env["MVM_EGRESS_RESOLVE"] = (
        f"allowed.test={internet},denied.test={internet},"
        "rebind.test=127.0.0.1,meta.test=169.254.169.254,gw.test=10.0.2.2,"
        f"mixed.test={internet},mixed.test=127.0.0.1"
    )
    return c


def audit_records(home: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for f in sorted((home / "audit").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == event:
                out.append(rec)
    return out


def fetch(ctl: Ctl, name: str, url: str) -> tuple[int, str]:
    """``urllib.request.urlopen(url)`` in the guest (through the proxy from the env):
    (0, body) or (HTTP status or -1, error text)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    print(urllib.request.urlopen({url!r}, timeout=20).read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print('HTTP', e.code, e.reason, e.read().decode(errors='replace')); sys.exit(3)\n"
        "except OSError as e:\n"
        "    print('ERR', e); sys.exit(4)\n"
    )
    r = ctl("exec", name, "--", "python3", "-c", code, timeout=60)
    return (0 if r.rc == 0 else r.rc), r.out + r.err


def guest_py(ctl: Ctl, name: str, code: str) -> str:
    r = ctl("exec", name, "--", "python3", "-c", code, timeout=90)
    assert r.rc == 0, str(r)
    return r.out


CONNECT_PROBE = """
import socket
s = socket.create_connection(("10.0.2.100", 3128), timeout=20)
s.sendall(b"CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % (TARGET, TARGET))
f = s.makefile("rb")
status = f.readline().decode().strip()
while f.readline() not in (b"\\r\\n", b""):
    pass
print(status)
if " 200 " in status:
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    print(f.read().decode(errors="replace"))
"""


def connect_probe(ctl: Ctl, name: str, target: str) -> str:
    return guest_py(ctl, name, f"TARGET = {target.encode()!r}\n" + CONNECT_PROBE)


DIRECT_PROBE = """
import socket
for host, port in TARGETS:
    try:
        socket.create_connection((host, port), timeout=3).close()
        print(host, port, "CONNECTED")
    except OSError as e:
        print(host, port, "failed:", type(e).__name__)
# slirp's DNS (10.0.2.3) must not answer either: a query for example.org, type A
q = bytes.fromhex("abcd01000001000000000000076578616d706c65036f72670000010001")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
try:
    u.sendto(q, ("10.0.2.3", 53))
    print("dns", "ANSWERED", len(u.recv(512)))
except OSError as e:
    print("dns", "failed:", type(e).__name__)
"""


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def sandboxes(ctl: Ctl) -> Iterator[tuple[str, ...]]:
    names = ("net-allow", "net-open", "net-none")
    try:
        ctl.ok("up", "--image", "python", "--name", "net-allow", "--network-allow",
               f"allowed.test:{PORT}", timeout=300)  # fmt: skip
        ctl.ok("up", "--image", "python", "--name", "net-open", "--network-preset", "unrestricted")
        ctl.ok("up", "--image", "python", "--name", "net-none")
        yield names
    finally:
        for sb in names:
            ctl("down", sb)


def test_up_with_allowlist_and_unrestricted_and_none(ctl: Ctl, sandboxes: object) -> None:
    sbs = ctl.sandboxes()
    assert sbs["net-allow"]["network"] == {"preset": "none", "allow": [f"allowed.test:{PORT}"]}
    assert sbs["net-open"]["network"]["preset"] == "unrestricted"
    assert sbs["net-none"]["network"] == {"preset": "none", "allow": []}
    table = ctl.ok("ls").out
    assert "unrestricted" in table and "none+1" in table


def test_bad_network_input_is_refused_before_booting(ctl: Ctl, sandboxes: object) -> None:
    r = ctl("up", "--image", "python", "--name", "net-bad", "--network-allow", "*.org")
    assert r.rc != 0 and "too broad" in r.err, str(r)
    r = ctl("up", "--image", "python", "--name", "net-bad", "--network-allow", "a b:1")
    assert r.rc != 0 and "'a b:1'" in r.err, str(r)
    assert "net-bad" not in ctl.sandboxes()


def test_preset_none_has_no_network_device(ctl: Ctl, sandboxes: object) -> None:
    out = guest_py(ctl, "net-none", "import os; print(sorted(os.listdir('/sys/class/net')))")
    assert out.strip() == "['lo']"
    env = guest_py(ctl, "net-none", "import os; print(os.environ.get('http_proxy'))")
    assert env.strip() == "None"


def test_allowed_name_is_reachable(ctl: Ctl, home: Path, sandboxes: object) -> None:
    rc, out = fetch(ctl, "net-allow", f"http://allowed.test:{PORT}/")
    assert rc == 0 and TOKEN in out, out
    recs = [r for r in audit_records(home, "egress.allowed") if r["sandbox"] == "net-allow"]
    assert any(r["data"]["host"] == "allowed.test" and r["data"]["port"] == PORT for r in recs)
    assert any(r["data"]["address"] == NS_ADDR for r in recs)


def test_https_style_connect_to_allowed_name(ctl: Ctl, sandboxes: object) -> None:
    out = connect_probe(ctl, "net-allow", f"allowed.test:{PORT}")
    assert out.startswith("HTTP/1.1 200") and TOKEN in out, out


def test_denied_name_is_refused_and_audited(ctl: Ctl, home: Path, sandboxes: object) -> None:
    rc, out = fetch(ctl, "net-allow", f"http://denied.test:{PORT}/")
    assert rc == 3 and "HTTP 403" in out and "mvm egress" in out and TOKEN not in out, out
    out = connect_probe(ctl, "net-allow", f"denied.test:{PORT}")
    assert out.startswith("HTTP/1.1 403") and TOKEN not in out, out
    recs = [r for r in audit_records(home, "egress.denied") if r["sandbox"] == "net-allow"]
    denied = [r for r in recs if r["data"]["host"] == "denied.test"]
    assert len(denied) >= 2 and all(r["data"]["rule"] == "not-allowed" for r in denied)
    # the allowed port is per name: another port of the allowed name is refused too
    rc, out = fetch(ctl, "net-allow", "http://allowed.test:8081/")
    assert rc == 3 and "HTTP 403" in out, out


def test_one_shot_run_gets_the_same_egress_policy(ctl: Ctl, home: Path, tmp_path: Path) -> None:
    """`mvmctl run` serves the same proxy in-process: allowed name fetched, denied refused,
    the receipt and the audit name the network."""
    code = (
        "import urllib.request, urllib.error\n"
        f"print(urllib.request.urlopen('http://allowed.test:{PORT}/', timeout=20).read().decode())\n"
        "try:\n"
        f"    urllib.request.urlopen('http://denied.test:{PORT}/', timeout=20)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print('denied', e.code)\n"
    )
    receipt = tmp_path / "r.json"
    args = ["run", "--network-allow", f"allowed.test:{PORT}", "--receipt", str(receipt)]
    r = ctl(*args, "--", "python3", "-c", code, timeout=120)
    assert r.rc == 0 and TOKEN in r.out and "denied 403" in r.out, str(r)
    assert json.loads(receipt.read_text())["policy"]["network_allow"] == [f"allowed.test:{PORT}"]
    launched = [r for r in audit_records(home, "sandbox.launched") if r["data"].get("oneshot")]
    assert launched and launched[-1]["data"]["network_allow"] == [f"allowed.test:{PORT}"]
    denied = [r["data"]["host"] for r in audit_records(home, "egress.denied")]
    assert "denied.test" in denied
    # and without a network the same run has no way out at all
    r = ctl("run", "--", "python3", "-c", code, timeout=120)
    assert r.rc != 0 and TOKEN not in r.out, str(r)


def test_raw_ip_through_the_proxy_is_refused(ctl: Ctl, home: Path, sandboxes: object) -> None:
    for sb in ("net-allow", "net-open"):
        rc, out = fetch(ctl, sb, f"http://{NS_ADDR}:{PORT}/")
        assert rc == 3 and "raw-ip" in out and TOKEN not in out, (sb, out)
    recs = audit_records(home, "egress.denied")
    assert {r["sandbox"] for r in recs if r["data"]["rule"] == "raw-ip"} >= {
        "net-allow",
        "net-open",
    }


def test_direct_connections_bypassing_the_proxy_fail(
    ctl: Ctl, loopback_service: int, sandboxes: object
) -> None:
    targets = [(NS_ADDR, PORT), ("10.0.2.2", 22), ("10.0.2.2", loopback_service),
               ("169.254.169.254", 80), (HOST_ADDR, 22)]  # fmt: skip
    for sb in ("net-allow", "net-open"):
        out = guest_py(ctl, sb, f"TARGETS = {targets!r}\n" + DIRECT_PROBE)
        lines = out.strip().splitlines()
        assert len(lines) == len(targets) + 1 and all("failed:" in ln for ln in lines), (sb, out)


def test_unrestricted_allows_names_but_never_loopback_or_metadata(
    ctl: Ctl, home: Path, loopback_service: int, sandboxes: object
) -> None:
    rc, out = fetch(ctl, "net-open", f"http://allowed.test:{PORT}/")
    assert rc == 0 and TOKEN in out, out
    for name, port in (("rebind.test", loopback_service), ("meta.test", 80), ("gw.test", 80),
                       ("mixed.test", PORT)):  # fmt: skip
        rc, out = fetch(ctl, "net-open", f"http://{name}:{port}/")
        assert rc == 3 and "always-refused" in out, (name, out)
        assert "HOST-LOOPBACK-SECRET" not in out and TOKEN not in out
        out = connect_probe(ctl, "net-open", f"{name}:{port}")
        assert out.startswith("HTTP/1.1 403"), (name, out)
    recs = [r for r in audit_records(home, "egress.denied") if r["sandbox"] == "net-open"]
    hosts = {r["data"]["host"] for r in recs if r["data"]["rule"] == "always-refused"}
    assert hosts >= {"rebind.test", "meta.test", "gw.test", "mixed.test"}


def test_malformed_proxy_requests_get_clear_errors(ctl: Ctl, sandboxes: object) -> None:
    code = """
import socket
for req in [b"GARBAGE\\r\\n\\r\\n", b"GET https://allowed.test/ HTTP/1.1\\r\\n\\r\\n",
            b"CONNECT allowed.test HTTP/1.1\\r\\n\\r\\n", b"GET /x HTTP/1.1\\r\\n\\r\\n",
            b"GET http://" + b"a" * 20000 + b"/ HTTP/1.1\\r\\n\\r\\n"]:
    s = socket.create_connection(("10.0.2.100", 3128), timeout=20)
    s.sendall(req)
    print(s.makefile("rb").readline().decode().strip())
    s.close()
"""
    lines = guest_py(ctl, "net-allow", code).strip().splitlines()
    assert [ln.split(" ")[1] for ln in lines] == ["400", "400", "400", "400", "431"], lines
    rc, out = fetch(ctl, "net-allow", f"http://allowed.test:{PORT}/")  # still serving
    assert rc == 0 and TOKEN in out, out


def test_proxy_listener_survives_an_mvmd_restart(ctl: Ctl, home: Path, sandboxes: object) -> None:
    old = ctl.daemon_pid()
    ctl.ok("daemon", "stop", timeout=60)
    assert wait_until(lambda: not (home / "mvmd.sock").exists() or _daemon_gone(old), 30)
    assert ctl.sandboxes()["net-allow"]["state"] == "running"  # a new mvmd reattached
    rc, out = fetch(ctl, "net-allow", f"http://allowed.test:{PORT}/")
    assert rc == 0 and TOKEN in out, out
    rc, out = fetch(ctl, "net-allow", f"http://denied.test:{PORT}/")
    assert rc == 3 and "HTTP 403" in out, out


def test_sandbox_recreated_from_a_snapshot_keeps_its_network(ctl: Ctl, sandboxes: object) -> None:
    ctl.ok("snapshot", "save", "net-allow", "s1", timeout=180)
    ctl.ok("down", "net-allow")
    ctl.ok("snapshot", "restore", "net-allow", "s1", timeout=180)
    assert ctl.sandboxes()["net-allow"]["network"]["allow"] == [f"allowed.test:{PORT}"]
    rc, out = fetch(ctl, "net-allow", f"http://allowed.test:{PORT}/")
    assert rc == 0 and TOKEN in out, out
    rc, out = fetch(ctl, "net-allow", f"http://denied.test:{PORT}/")
    assert rc == 3 and "HTTP 403" in out, out
    ctl.ok("snapshot", "rm", "net-allow", "s1")


def _daemon_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    time.sleep(0.1)
    return False
