"""`mvmctl serve` driven by real clients: the PyPI `e2b` SDK and remote `mvmctl`.

One server on a free loopback port over a private MVM_HOME; two tenants with their own
tokens; one shared E2B sandbox for most checks (VMs are slow under TCG).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

e2b = pytest.importorskip("e2b")
from e2b import AsyncSandbox, AuthenticationException, Sandbox, SandboxQuery, SandboxState  # noqa: E402
from e2b.exceptions import NotFoundException, SandboxNotFoundException  # noqa: E402
from e2b.sandbox.commands.command_handle import CommandExitException  # noqa: E402

from mvm import tenancy  # noqa: E402
from tests.integration.mvmd_home import Ctl, private_home, wait_until  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "python-3.11"


@dataclass
class Served:
    url: str
    home: Path
    ctl: Ctl
    acme: str  # token of tenant acme
    acme_id: str
    other: str  # token of tenant other


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with private_home("mvsrv-") as home:
        ctl = Ctl(home)
        acme = ctl.json("token", "create", "--tenant", "acme")
        other = ctl.json("token", "create", "--tenant", "other")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = (home / "serve.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mvm.cli.main", "serve", "--listen", f"127.0.0.1:{port}"],
            env=ctl.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )

        def up() -> bool:
            try:
                return httpx.get(f"{url}/v1/status", timeout=2).status_code == 401
            except httpx.TransportError:
                return False

        old = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")}
        try:
            assert wait_until(up, 60), (home / "serve.log").read_text()
            os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=acme["token"])
            yield Served(url, home, ctl, acme["token"], acme["id"], other["token"])
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


@pytest.fixture(scope="module")
def sb(served: Served) -> Iterator[Sandbox]:
    s = Sandbox.create(IMAGE, timeout=1800, metadata={"suite": "serve"})
    try:
        yield s
    finally:
        s.kill()  # False when a test already removed it; an error is a real failure


# ------------------------------------------------------------------------------ tokens


def test_no_or_wrong_token_is_a_bare_401(served: Served) -> None:
    for headers in ({}, {"Authorization": "Bearer mvm_tnope_x"}, {"X-API-Key": "junk"}):
        r = httpx.get(f"{served.url}/v1/sandboxes", headers=headers)
        assert r.status_code == 401
        assert r.json() == {"code": 401, "message": "unauthorized"}
    with pytest.raises(AuthenticationException):
        Sandbox.create(IMAGE, api_key="mvm_tdeadbeef00_wrong")


def test_revoked_token_stops_working(served: Served) -> None:
    tok = served.ctl.json("token", "create", "--tenant", "acme", "--ttl", "1h")
    h = {"Authorization": f"Bearer {tok['token']}"}
    assert httpx.get(f"{served.url}/v1/sandboxes", headers=h).status_code == 200
    listed = served.ctl.json("token", "ls")
    assert tok["id"] in {t["id"] for t in listed}
    assert all("token" not in t for t in listed)
    served.ctl.ok("token", "revoke", tok["id"])
    assert httpx.get(f"{served.url}/v1/sandboxes", headers=h).status_code == 401


# ------------------------------------------------------------------------------ e2b SDK


def test_commands_run_exit_code_stdout_stderr(sb: Sandbox) -> None:
    r = sb.commands.run("echo hi; echo oops >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\n", "oops\n")
    with pytest.raises(CommandExitException) as exc:
        sb.commands.run("echo partial; exit 3")
    assert exc.value.exit_code == 3 and exc.value.stdout == "partial\n"
    r = sb.commands.run("echo $GREETING from $(pwd)", envs={"GREETING": "hello"}, cwd="/tmp")
    assert r.stdout == "hello from /tmp\n"
    assert sb.commands.run("id -un").stdout == "user\n"
    assert sb.commands.run("id -un", user="root").stdout == "root\n"


def test_background_command_list_and_kill(sb: Sandbox) -> None:
    h = sb.commands.run("sleep 300", background=True)
    assert h.pid in {p.pid for p in sb.commands.list()}
    assert sb.commands.kill(h.pid)
    assert wait_until(lambda: h.pid not in {p.pid for p in sb.commands.list()}, 30)


def test_stdin_and_connect_to_a_running_command(sb: Sandbox) -> None:
    h = sb.commands.run("cat; echo done", background=True, stdin=True)
    sb.commands.send_stdin(h.pid, "hello\n")
    again = sb.commands.connect(h.pid)  # a second handle on the same process
    sb.commands.close_stdin(h.pid)
    r = again.wait()
    assert (r.exit_code, r.stdout) == (0, "hello\ndone\n")


def test_files_write_read_list_remove_make_dir_exists(sb: Sandbox) -> None:
    sb.files.make_dir("/tmp/e2b")
    sb.files.write("/tmp/e2b/a.txt", "hello")
    assert sb.files.read("/tmp/e2b/a.txt") == "hello"
    sb.files.write("/tmp/e2b/b.bin", b"\x00\x01\xff")
    assert bytes(sb.files.read("/tmp/e2b/b.bin", format="bytes")) == b"\x00\x01\xff"
    assert {e.name for e in sb.files.list("/tmp/e2b")} == {"a.txt", "b.bin"}
    assert sb.files.exists("/tmp/e2b/a.txt") and not sb.files.exists("/tmp/e2b/none")
    assert sb.files.make_dir("/tmp/e2b/x/y") is True
    assert sb.files.make_dir("/tmp/e2b/x/y") is False
    sb.files.rename("/tmp/e2b/b.bin", "/tmp/e2b/c.bin")
    sb.files.remove("/tmp/e2b/a.txt")
    assert {e.name for e in sb.files.list("/tmp/e2b")} == {"c.bin", "x"}
    with pytest.raises(NotFoundException):
        sb.files.read("/tmp/e2b/a.txt")


def test_info_list_and_set_timeout(sb: Sandbox) -> None:
    before = Sandbox.get_info(sb.sandbox_id)
    assert before.metadata == {"suite": "serve"} and before.state.value == "running"
    sb.set_timeout(3600)
    after = Sandbox.get_info(sb.sandbox_id)
    assert after.end_at > before.end_at
    ids = {s.sandbox_id for s in Sandbox.list().next_items()}
    assert sb.sandbox_id in ids
    q = SandboxQuery(metadata={"suite": "serve"}, state=[SandboxState.RUNNING])
    assert [s.sandbox_id for s in Sandbox.list(query=q).next_items()] == [sb.sandbox_id]
    q = SandboxQuery(metadata={"suite": "other value/&"})
    assert Sandbox.list(query=q).next_items() == []


def test_pause_then_connect_keeps_state(sb: Sandbox) -> None:
    sb.files.write("/tmp/kept.txt", "still here")
    assert sb.pause() is True
    assert Sandbox.get_info(sb.sandbox_id).state.value == "paused"
    again = Sandbox.connect(sb.sandbox_id)
    assert again.files.read("/tmp/kept.txt") == "still here"
    assert again.commands.run("echo back").stdout == "back\n"


def test_async_sandbox_end_to_end(served: Served) -> None:
    async def main() -> tuple[str, str, bool]:
        a = await AsyncSandbox.create(IMAGE, timeout=600)
        try:
            r = await a.commands.run("echo async")
            await a.files.write("/tmp/async.txt", "a")
            text = await a.files.read("/tmp/async.txt")
        finally:
            await a.kill()
        gone = a.sandbox_id not in {s.sandbox_id for s in await AsyncSandbox.list().next_items()}
        return r.stdout, text, gone

    assert asyncio.run(main()) == ("async\n", "a", True)


def test_server_survives_an_mvmd_restart(served: Served, sb: Sandbox) -> None:
    old = served.ctl.daemon_pid()
    served.ctl.ok("daemon", "stop", timeout=60)
    assert Sandbox.get_info(sb.sandbox_id).state.value == "running"  # mvmd started again
    assert sb.commands.run("echo still").stdout == "still\n"
    assert served.ctl.daemon_pid() != old


def test_envd_routing_by_host_name(served: Served, sb: Sandbox) -> None:
    """With only E2B_DOMAIN set, the SDK addresses envd as <port>-<id>.<domain>."""
    r = httpx.post(
        f"{served.url}/filesystem.Filesystem/Stat",
        json={"path": "/tmp"},
        headers={"Host": f"49983-{sb.sandbox_id}.mvm.test", "X-Access-Token": served.acme},
    )
    assert r.status_code == 200 and r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY", r.text


# ------------------------------------------------------------------------------ tenants


def test_tenants_are_isolated(served: Served, sb: Sandbox) -> None:
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sb.sandbox_id, api_key=served.other)
    h = {"Authorization": f"Bearer {served.other}"}
    assert httpx.get(f"{served.url}/v1/sandboxes/{sb.sandbox_id}", headers=h).status_code == 404
    assert httpx.get(f"{served.url}/v1/sandboxes", headers=h).json() == []
    r = httpx.post(
        f"{served.url}/process.Process/List",
        json={},
        headers={"X-Access-Token": served.other, "E2b-Sandbox-Id": sb.sandbox_id},
    )
    assert r.status_code == 404
    # The owner of the host sees it under its tenant prefix.
    local = {s["name"] for s in served.ctl.json("ls")}
    assert any(n.endswith("-" + sb.sandbox_id) and n != sb.sandbox_id for n in local)


def test_a_tenant_policy_applies_to_that_tenant_only(served: Served) -> None:
    policies = served.home / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "other.toml").write_text("max_memory_mb = 256\n")
    h = {"Authorization": f"Bearer {served.other}"}
    r = httpx.post(f"{served.url}/v1/sandboxes", json={"name": "big", "memory_mb": 512}, headers=h)
    assert r.status_code == 403 and r.json()["error"] == "PolicyDenied", r.text
    assert "big" not in {
        s["name"] for s in httpx.get(f"{served.url}/v1/sandboxes", headers=h).json()
    }


def test_tenant_audit_chain_has_the_token_as_actor(served: Served, sb: Sandbox) -> None:
    chain = served.home / "audit" / "acme.jsonl"
    assert wait_until(chain.exists, 60)
    recs = [json.loads(line) for line in chain.read_text().splitlines()]
    # The server writes no record of its own: mvmd records what each request did.
    assert not [r for r in recs if r["event"].startswith("serve.")]
    # mvmd's records of the tenant's sandbox (its creation, files, processes) too: those
    # made for a request name the token; those mvmd makes on its own (a guest's exit
    # event, read by the agent connection) name mvmd, in the same chain.
    mine = recs
    assert mine and {r["actor"] for r in mine} <= {served.acme_id, "mvmd"}
    assert any(r["actor"] == served.acme_id for r in mine)
    assert any(r["sandbox"] and r["sandbox"].endswith("-" + sb.sandbox_id) for r in mine)
    owner_log = served.home / "audit" / "default.jsonl"
    owner = (
        [json.loads(x) for x in owner_log.read_text().splitlines()] if owner_log.exists() else []
    )
    leaked = [r for r in owner if (r["sandbox"] or "").endswith("-" + sb.sandbox_id)]
    assert not leaked, leaked
    assert all(r["tenant"] == "acme" for r in recs)
    assert served.acme not in chain.read_text()


def test_a_tenants_sandbox_reaped_by_ttl_leaves_its_records_in_the_tenants_chain(
    served: Served,
) -> None:
    """Records mvmd makes on its own, between requests (a guest-reported exit, the TTL
    reaper), go to the chain of the tenant whose sandbox it is, not the owner's."""
    h = {"Authorization": f"Bearer {served.acme}"}
    api = f"{served.url}/v1/sandboxes"
    r = httpx.post(api, json={"name": "reapme", "image": IMAGE}, headers=h, timeout=600)
    assert r.status_code == 201, r.text
    full = tenancy.to_service("acme", "reapme")
    r = httpx.post(f"{api}/reapme/procs", json={"argv": ["sh", "-c", "exit 5"]}, headers=h)
    assert r.status_code == 201, r.text
    proc = r.json()["proc"]

    def exited() -> bool:
        ps = httpx.get(f"{api}/reapme/procs", headers=h, timeout=30).json()
        return any(p["proc"] == proc and not p["running"] for p in ps)

    assert wait_until(exited, 120)
    r = httpx.post(f"{api}/reapme/ttl", json={"ttl_seconds": 1}, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    gone = lambda: httpx.get(f"{api}/reapme", headers=h, timeout=30).status_code == 404  # noqa: E731
    assert wait_until(gone, 120)

    def records(tenant: str) -> list[dict[str, object]]:
        p = served.home / "audit" / f"{tenant}.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    assert wait_until(
        lambda: any(r["sandbox"] == full and r["event"] == "proc.exited" for r in records("acme")),
        30,
    )
    acme = [r for r in records("acme") if r["sandbox"] == full]
    stopped = [r for r in acme if r["event"] == "sandbox.stopped"]
    assert [(r["actor"], r["data"]["reason"]) for r in stopped] == [("mvmd", "ttl")]  # type: ignore[index]
    exits = [r for r in acme if r["event"] == "proc.exited"]
    assert [(r["actor"], r["data"]["exit_code"]) for r in exits] == [("mvmd", 5)]  # type: ignore[index]
    launched = [r for r in acme if r["event"] == "sandbox.launched"]
    assert [r["actor"] for r in launched] == [served.acme_id]
    assert not [r for r in records("default") if r["sandbox"] == full]
    verified = served.ctl.ok("audit", "verify", "--file", str(served.home / "audit" / "acme.jsonl"))
    assert verified.out.startswith("ok: ")
    # The owner's chain: one record of its own at least (a denied launch), then verified.
    assert served.ctl("up", "--image", IMAGE, "--name", "owner-big", "--memory", "16000").rc
    assert served.ctl.ok("audit", "verify").out.startswith("ok: ")


def test_the_owners_own_calls_carry_the_actor_they_name(served: Served) -> None:
    """MVM_ACTOR labels the owner's calls on mvmd's socket (X-Mvm-Actor without a tenant):
    mvmd's records of them name it instead of mvmd; a malformed label is refused."""
    ctl = Ctl(served.home)
    ctl.env["MVM_ACTOR"] = "ci-bot"
    r = ctl("up", "--image", IMAGE, "--name", "labelled", "--memory", "16000")
    assert r.rc == 125 and "policy denied" in r.err, r
    log = served.home / "audit" / "default.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    denied = [r for r in recs if r["event"] == "plan.denied" and r["sandbox"] == "labelled"]
    assert [r["actor"] for r in denied] == ["ci-bot"]
    ctl.env["MVM_ACTOR"] = "not a label"
    r = ctl("ls")
    assert r.rc == 2 and "invalid actor" in r.err, r


# ------------------------------------------------------------------------------ remote mvmctl


def test_remote_mvmctl_up_exec_down(served: Served, tmp_path: Path) -> None:
    remote = Ctl(tmp_path)  # an empty home: everything goes over TCP
    remote.env.update(MVM_URL=served.url, MVM_TOKEN=served.acme)
    remote.ok("up", "--image", IMAGE, "--name", "remote1", "--ttl", "10m")
    try:
        r = remote.ok("exec", "remote1", "--", "sh", "-c", "echo out; echo err >&2")
        assert (r.out, r.err) == ("out\n", "err\n")
        assert remote("exec", "remote1", "--", "sh", "-c", "exit 7").rc == 7
        names = {s["name"] for s in remote.json("ls")}
        assert "remote1" in names and not any(re.match(r"t[0-9a-f]{10}-", n) for n in names)
        # Secrets: the tenant's `api` is the owner's `t<hash>-api`; the owner's own are not
        # reachable, and values are redacted on the way out as for local callers.
        value = "v-" + os.urandom(6).hex()
        own = tenancy.to_service("acme", "api", "secret")
        served.ctl.ok("secret", "put", own, input=value + "\n")
        served.ctl.ok("secret", "put", "owner-only", input=value + "\n")
        r = remote.ok("exec", "-e", "TOK=secret:api", "remote1", "--", "sh", "-c", "echo $TOK")
        assert value not in r.out + r.err and "[REDACTED:" in r.out
        r = remote("exec", "-e", "TOK=secret:owner-only", "remote1", "--", "true")
        assert r.rc == 125 and value not in r.out + r.err, r
        bad = Ctl(served.home)
        bad.env.update(MVM_URL=served.url, MVM_TOKEN=served.other)
        assert bad("exec", "remote1", "--", "true").rc == 125  # not found for another tenant
    finally:
        remote.ok("down", "remote1")
    assert "remote1" not in {s["name"] for s in remote.json("ls")}


SDK_SCRIPT = """
import mvm
from mvm.errors import SandboxNotFound
sb = mvm.Sandbox.create("python-3.11", name="sdk-remote", ttl="10m")
try:
    r = sb.commands.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\\n", "err\\n"), r
    sb.files.write("/tmp/r.txt", b"remote")
    assert sb.files.read("/tmp/r.txt") == b"remote"
    assert "sdk-remote" in [s.name for s in mvm.Sandbox.list()]
finally:
    sb.destroy()
try:
    mvm.Sandbox.connect("sdk-remote")
except SandboxNotFound:
    print("remote sdk ok")
"""


def test_remote_python_sdk(served: Served, tmp_path: Path) -> None:
    env = {**os.environ, "MVM_URL": served.url, "MVM_TOKEN": served.acme}
    env["MVM_HOME"] = str(tmp_path)
    p = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("remote sdk ok")


# ------------------------------------------------------------------------------ docs


def test_docs_e2b_example_runs(served: Served, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "e2b.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    env = {**os.environ, "E2B_API_URL": served.url, "E2B_SANDBOX_URL": served.url}
    env["E2B_API_KEY"] = served.acme
    p = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert "hello from mvm" in p.stdout


def test_failed_auth_is_rate_limited_per_address(served: Served) -> None:
    # The guesses come from 127.0.0.2 (the server listens on 127.0.0.1, reachable from
    # any loopback source), so the other tests' client at 127.0.0.1 keeps its budget
    # whatever the order: the limit is per address.
    guesser = httpx.AsyncHTTPTransport(local_address="127.0.0.2")

    async def guess() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, transport=guesser) as c:
            rs = await asyncio.gather(
                *(c.get("/v1/status", headers={"X-API-Key": f"bad{i}"}) for i in range(60))
            )
        return [r.status_code for r in rs]

    codes = asyncio.run(guess())  # 60 failures at once: more than the burst of 20
    assert set(codes) == {401, 429} and codes.count(401) <= 40, codes
    h = {"Authorization": f"Bearer {served.acme}"}
    # Another address is not held back by the guesser's bucket.
    assert httpx.get(f"{served.url}/v1/status", headers=h).status_code == 200
    from_guesser = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with from_guesser:
        ok = wait_until(
            lambda: from_guesser.get(f"{served.url}/v1/status", headers=h).status_code == 200,
            30,
            0.5,
        )
    assert ok, "the address never recovered"


# ------------------------------------------------------------------------------ listening


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_p, key_p = tmp / "cert.pem", tmp / "key.pem"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_p, key_p


def test_tls_listen(served: Served, tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    port = free_port()
    p = served.ctl.popen(
        "serve", "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}/v1/sandboxes"
        h = {"Authorization": f"Bearer {served.acme}"}

        def up() -> bool:
            try:
                return httpx.get(url, headers=h, verify=ctx, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(up, 60)
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken there
            httpx.get(f"http://127.0.0.1:{port}/v1/sandboxes", headers=h, timeout=5)
    finally:
        p.terminate()
        p.wait(20)


def test_wildcard_needs_the_flag_and_bad_bodies_are_bounded(served: Served) -> None:
    r = served.ctl("serve", "--listen", "0.0.0.0:1", timeout=60)
    assert r.rc == 125 and "--allow-wildcard" in r.err, r  # PolicyDenied
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"PUT /v1/sandboxes/x/files?path=/a HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {served.acme}\r\n".encode()
            + b"Content-Length: 999999999999\r\n\r\n"
        )
        head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 413"), head


def test_a_clients_own_call_is_audited_by_mvmd_in_the_tenants_chain(served: Served) -> None:
    """POST /v1/calls (how `mvmctl mcp` records each tool call): written by mvmd, in the
    tenant's chain with the token id as actor; a bad call name is a 400."""
    h = {"Authorization": f"Bearer {served.acme}"}
    r = httpx.post(f"{served.url}/v1/calls", headers=h, json={"via": "mcp", "call": "run_code"})
    assert r.status_code == 201, r.text
    audit_id = r.json()["audit_id"]
    chain = served.home / "audit" / "acme.jsonl"
    rec = next(json.loads(x) for x in chain.read_text().splitlines() if audit_id in x)
    assert rec["event"] == "mcp.call" and rec["data"] == {"call": "run_code"}
    assert rec["actor"] == served.acme_id
    bad = httpx.post(f"{served.url}/v1/calls", headers=h, json={"via": "mcp", "call": "a b"})
    assert bad.status_code == 400
    nobody = httpx.post(
        f"{served.url}/v1/sandboxes/nope/calls", headers=h, json={"via": "mcp", "call": "x"}
    )
    assert nobody.status_code == 404
