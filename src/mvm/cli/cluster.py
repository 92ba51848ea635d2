"""``mvmctl cluster up|status|down|join|rejoin`` and ``mvmctl migrate``: many hosts on Ray.

Thin: the supervisor (Ray, host actors, the front) is :mod:`mvm.cluster.local`; these
commands start it, ask its front over HTTP with the admin token ``up`` made, or stop it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from mvm import errors
from mvm.cli.common import fail_on_errors
from mvm.tokens import TokenStore

UP_TIMEOUT = 600.0


def _dir() -> Path:
    from mvm import paths

    return paths.home() / "cluster"


def _state() -> dict[str, Any]:
    f = _dir() / "state.json"
    tok = _dir() / "token.json"
    if not f.is_file() or not tok.is_file():
        raise errors.MvmError("no cluster is up here", hint="start one with `mvmctl cluster up`")
    st: dict[str, Any] = json.loads(f.read_text())
    st.update(json.loads(tok.read_text()))
    return st


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _front(method: str, path: str, **kw: Any) -> Any:
    st = _state()
    try:
        r = httpx.request(
            method,
            f"{st['url']}/v1/cluster/{path}",
            headers={"Authorization": f"Bearer {st['token']}"},
            timeout=300.0,
            **kw,
        )
    except httpx.TransportError as exc:
        raise errors.MvmError(f"the cluster front does not answer: {exc}") from None
    if r.status_code >= 400:
        raise errors.MvmError(f"the cluster front answered {r.status_code}: {r.text[:300]}")
    return r.json()


@click.group("cluster")
def cluster() -> None:
    """Many hosts on Ray: placement, failover, migration (docs/cluster.md)."""


@cluster.command("up")
@click.option("--local-hosts", type=int, default=0, help="Simulated hosts on this machine.")
@click.option("--host-home", multiple=True, help="MVM_HOME of each simulated host, in order.")
@click.option("--ray-address", default=None, help="Use this Ray cluster (`ray start --head`).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="The front's address.")
@click.option("--policy", type=click.Choice(["spread", "pack"]), default="spread")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def up(
    local_hosts: int,
    host_home: tuple[str, ...],
    ray_address: str | None,
    listen: str,
    policy: str,
    as_json: bool,
) -> None:
    """Start Ray (or join RAY_ADDRESS), a host actor per host and the front; print its URL
    and an admin token."""
    if (local_hosts > 0) == bool(ray_address):
        raise errors.InvalidArgument("give either --local-hosts N or --ray-address ADDR")
    d = _dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (d / "state.json").is_file():
        old = json.loads((d / "state.json").read_text())
        if _alive(int(old["pid"])):
            raise errors.MvmError("a cluster is already up here", hint="`mvmctl cluster down`")
        (d / "state.json").unlink()
    plain, rec = TokenStore().create("default", scopes=["sandboxes", "e2b", "admin"])
    tok = d / "token.json"
    tok.touch(mode=0o600)
    tok.write_text(json.dumps({"token": plain, "token_id": rec.id}))
    argv = [sys.executable, "-m", "mvm.cluster.local", "--listen", listen, "--policy", policy]
    argv += ["--local-hosts", str(local_hosts)]
    for h in host_home:
        argv += ["--host-home", h]
    if ray_address:
        argv += ["--ray-address", ray_address]
    env = {k: v for k, v in os.environ.items() if k not in ("MVM_URL", "MVM_TOKEN")}
    with (d / "supervisor.log").open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    deadline = time.monotonic() + UP_TIMEOUT
    while not (d / "state.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            tail = (d / "supervisor.log").read_text(errors="replace")[-1500:]
            raise errors.MvmError(f"the cluster did not come up:\n{tail}")
        time.sleep(0.3)
    st = _state()
    out = {k: st[k] for k in ("url", "token", "token_id", "ray_address", "hosts", "pid")}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"cluster front: {st['url']}  hosts: {', '.join(st['hosts'])}")
    click.echo(f"export MVM_URL={st['url']} MVM_TOKEN={st['token']}")


@cluster.command("status")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def status(as_json: bool) -> None:
    """Hosts, their capacity and sandboxes; lost sandboxes and why."""
    st = _front("GET", "status")
    if as_json:
        click.echo(json.dumps(st))
        return
    for h in st["hosts"]:
        cap = h.get("capacity", {})
        state = "up" if h["alive"] else f"LOST ({h['lost']})"
        click.echo(
            f"{h['name']:<10} {state:<8} {h['url']:<24} free={cap.get('free_mb', '?')}M "
            f"vcpus={cap.get('vcpus', '?')} running={cap.get('running', '?')} "
            f"warm={len(cap.get('warm', []))} sandboxes={','.join(h['sandboxes']) or '-'}"
        )
    for name, lost in st.get("lost", {}).items():
        click.echo(f"lost: {name} on {lost['host']}: {lost['reason']}")


@cluster.command("down")
@fail_on_errors
def down() -> None:
    """Stop the front, the host actors (a simulated host's mvmd and sandboxes too) and Ray."""
    st = _state()
    pid = int(st["pid"])
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 300
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    try:
        TokenStore().revoke(str(st["token_id"]))
    except errors.MvmError:
        pass
    for f in ("state.json", "token.json"):
        (_dir() / f).unlink(missing_ok=True)
    click.echo("cluster down")


@cluster.command("join")
@click.argument("ray_address")
@click.option("--name", default=None, help="This host's name (default: the hostname).")
@fail_on_errors
def join(ray_address: str, name: str | None) -> None:
    """Join this machine to the Ray cluster at RAY_ADDRESS as an mvm host (its mvmd runs
    in this $MVM_HOME); the front starts its host actor."""
    from mvm import names

    name = name or socket.gethostname().split(".")[0]
    names.check("tenant", name)  # the same rule: a short safe label
    ray_bin = Path(sys.executable).parent / "ray"
    argv = [str(ray_bin), "start", "--address", ray_address, "--num-cpus", "1"]
    argv += ["--resources", json.dumps({f"mvmhost:{name}": 1})]
    r = subprocess.run(argv, check=False)
    if r.returncode != 0:
        raise errors.MvmError(f"`ray start` failed ({r.returncode})")
    click.echo(f"joined as host {name}")


@cluster.command("rejoin")
@click.argument("host")
@fail_on_errors
def rejoin(host: str) -> None:
    """Bring a lost HOST whose node is still up back (a new host actor; mvmd reattaches
    what still runs there)."""
    r = _front("POST", f"hosts/{host}/rejoin")
    click.echo(f"{r['name']} {'up' if r['alive'] else 'still lost'} at {r['url']}")


@click.command("migrate")
@click.argument("name")
@click.option("--to", "to", required=True, help="The host to move it to.")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def migrate(name: str, to: str, as_json: bool) -> None:
    """Move running sandbox NAME to host TO (a cluster front: MVM_URL + MVM_TOKEN); its
    memory, files and processes go with it, the name stays. Prints the pause.

    Live: QEMU pre-copy over TCP with TLS between the hosts; the pause is the last pass."""
    from mvm import client, names

    names.check("sandbox", name)
    url = client.remote_url()
    if url is None:
        raise errors.InvalidArgument(
            "migrate needs a cluster front", hint="set MVM_URL and MVM_TOKEN"
        )
    r = httpx.post(
        f"{url}/v1/sandboxes/{name}/migrate",
        params={"to": to},
        headers={"Authorization": f"Bearer {os.environ.get('MVM_TOKEN', '')}"},
        timeout=900.0,
    )
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            body = {"message": r.text[:300]}
        raise errors.MvmError(f"migrate failed ({r.status_code}): {body.get('message', body)}")
    out = r.json()
    if as_json:
        click.echo(json.dumps(out))
        return
    pause = out.get("pause_seconds")
    sent = out.get("transferred_bytes") or 0
    click.echo(
        f"{name}: {out['from']} -> {out['to']}  pause "
        + (f"{pause * 1000:.0f} ms" if isinstance(pause, int | float) else "unknown")
        + f"  total {out['total_seconds']:.2f}s  sent {sent >> 20} MiB"
        + f" in {out.get('passes') or '?'} passes"
    )
    for f in out.get("forwards", []):
        click.echo(f"forward {f['host']}:{f['host_port']} -> guest port {f['guest_port']}")
    for w in out.get("warnings", []):
        click.echo(f"warning: {w}", err=True)


COMMANDS = [cluster, migrate]
