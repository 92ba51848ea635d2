"""`mvmctl cluster` on one machine: creates per second through the front with 2 simulated
hosts against 1, and a live migration's pause and total for a sandbox with dirtied memory.

Run: ``.venv/bin/python bench/cluster.py [--creates N] [--dirty-mb N] [--migration-only] [--json]``

Each run: throw-away homes under /tmp (images shared with the default store), `mvmctl
cluster up --local-hosts N`, ``--creates`` concurrent creates through the front (HTTP,
admin token), every sandbox removed, then (2 hosts) one 1 GiB sandbox with
``--dirty-mb`` of random data written into its memory (its writable layer) is first
saved as a local snapshot (the stop-and-copy reference: how long a save alone stops the
guest), then migrated live to the other host, and the data's SHA-256 checked there.
Figures are printed beside their floor from the same run (1 host for creates/s; for the
migration's total, the same bytes through a loopback TCP socket; for its pause, the
stop-and-copy reference) and the target as a ratio (2 hosts: twice the creates/s; the
pause: QEMU's 300 ms downtime limit). `cluster down` and the homes
removed at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx

from common import default_store, kill_strays
from mvm.cluster.local import host_home

MVMCTL = [sys.executable, "-m", "mvm.cli.main"]
IMAGE = "python"


def ctl(home: Path, *args: str, timeout: float = 900) -> str:
    env = {**os.environ, "MVM_HOME": str(home)}
    for k in ("MVM_URL", "MVM_TOKEN"):
        env.pop(k, None)
    p = subprocess.run([*MVMCTL, *args], env=env, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"mvmctl {' '.join(args)} failed: {p.stderr.decode()[-800:]}")
    return p.stdout.decode()


async def creates(url: str, token: str, n: int, tag: str) -> tuple[float, list[str]]:
    hdr = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=hdr, timeout=900) as c:

        async def one(i: int) -> str:
            r = await c.post("/v1/sandboxes", json={"name": f"{tag}{i}", "image": IMAGE})
            r.raise_for_status()
            return str(r.json()["name"])

        t0 = time.monotonic()
        made = await asyncio.gather(*(one(i) for i in range(n)))
        took = time.monotonic() - t0
        await asyncio.gather(*(c.delete(f"/v1/sandboxes/{m}") for m in made))
    return n / took, list(made)


def loopback_seconds(nbytes: int) -> float:
    """The wire floor: ``nbytes`` through one loopback TCP connection (no TLS, no QEMU)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    t = threading.Thread(target=sink)
    t.start()
    chunk = os.urandom(1 << 20)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as c:
        left = nbytes
        while left > 0:
            c.sendall(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    t.join()
    took = time.monotonic() - t0
    srv.close()
    return took


def migrate(url: str, token: str, dirty_mb: int, busy: bool = False) -> dict[str, Any]:
    hdr = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=hdr, timeout=900) as c:
        r = c.post("/v1/sandboxes", json={"name": "mig", "image": IMAGE, "memory_mb": 1024})
        r.raise_for_status()
        src = r.json()
        cmd = f"head -c {dirty_mb}M /dev/urandom > /work/dirty && sha256sum /work/dirty > /work/sum"
        c.post("/v1/sandboxes/mig/exec", json={"argv": ["sh", "-c", cmd]}).raise_for_status()
        # The stop-and-copy reference: the guest stands still for a whole local save.
        t0 = time.monotonic()
        c.post("/v1/sandboxes/mig/snapshots", json={"name": "ref"}).raise_for_status()
        save_pause = time.monotonic() - t0
        c.delete("/v1/sandboxes/mig/snapshots/ref").raise_for_status()
        hosts = {s["name"]: s["host"] for s in c.get("/v1/sandboxes").json()}
        to = "h2" if hosts["mig"] == "h1" else "h1"
        if busy:  # a guest that keeps dirtying memory while it is sent (~32 MB rewritten)
            loop = "while true; do head -c 32M /dev/urandom > /work/busy; done"
            r = c.post("/v1/sandboxes/mig/procs", json={"argv": ["sh", "-c", loop]})
            r.raise_for_status()
        out = c.post("/v1/sandboxes/mig/migrate", params={"to": to})
        out.raise_for_status()
        check = c.post("/v1/sandboxes/mig/exec", json={"argv": ["sha256sum", "-c", "/work/sum"]})
        check.raise_for_status()
        events = [json.loads(x) for x in check.text.splitlines() if x.strip()]
        c.delete("/v1/sandboxes/mig")
        m = out.json()
        return {
            **m,
            "memory_mb": src["memory_mb"],
            "save_pause_seconds": save_pause,
            "wire_seconds": loopback_seconds(int(m["transferred_bytes"])),
            "dirty_kept": any(e.get("exit_code") == 0 for e in events),
            "busy": busy,
        }


def run(n_hosts: int, n_creates: int, dirty_mb: int, busy: bool = False) -> dict[str, Any]:
    store = default_store()
    front = host_home(store, Path(tempfile.mkdtemp(prefix="mvbcf-", dir="/tmp")))
    homes = [
        host_home(store, Path(tempfile.mkdtemp(prefix=f"mvbh{i}-", dir="/tmp")))
        for i in range(n_hosts)
    ]
    out: dict[str, Any] = {"hosts": n_hosts}
    try:
        args = ["cluster", "up", "--local-hosts", str(n_hosts), "--json"]
        for h in homes:
            args += ["--host-home", str(h)]
        up = json.loads(ctl(front, *args))
        if n_creates:
            out["creates_per_s"], _ = asyncio.run(creates(up["url"], up["token"], n_creates, "b"))
        if n_hosts >= 2:
            out["migration"] = migrate(up["url"], up["token"], dirty_mb, busy)
    finally:
        try:
            ctl(front, "cluster", "down", timeout=600)
        finally:
            for h in [front, *homes]:
                kill_strays(str(h))
                for n in ("rootfs", "kernels", "initramfs", "templates", "build.lock"):
                    if (h / n).is_symlink():
                        (h / n).unlink()
                shutil.rmtree(h, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--creates", type=int, default=6)
    p.add_argument("--dirty-mb", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.add_argument("--migration-only", action="store_true", help="skip the creates/s rows")
    p.add_argument("--busy", action="store_true", help="the guest keeps writing while it moves")
    a = p.parse_args()
    if a.migration_only:
        two = run(2, 0, a.dirty_mb, a.busy)
        report_migration(two["migration"], a.dirty_mb, a.json)
        return
    one = run(1, a.creates, a.dirty_mb)
    two = run(2, a.creates, a.dirty_mb)
    ratio = two["creates_per_s"] / one["creates_per_s"]
    report = {"one_host": one, "two_hosts": two, "creates_ratio": ratio, "target_ratio": 2.0}
    if a.json:
        print(json.dumps(report))
        return
    print(f"creates/s, {a.creates} concurrent: 2 hosts {two['creates_per_s']:.3f}  "
          f"floor (1 host) {one['creates_per_s']:.3f}  ratio {ratio:.2f} (target 2.0: "
          f"{ratio / 2.0:.2f} of it)")  # fmt: skip
    report_migration(two["migration"], a.dirty_mb, False)


def report_migration(m: dict[str, Any], dirty_mb: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(m))
        return
    pause, total = m["pause_seconds"], m["total_seconds"]
    print(f"migration, {dirty_mb} MB dirtied in {m['memory_mb']} MiB, live (pre-copy, TCP+TLS)"
          f"{', guest writing throughout' if m.get('busy') else ''}: "
          f"{m['transferred_bytes'] >> 20} MiB sent in {m['passes']} passes, "
          f"data intact: {m['dirty_kept']}")  # fmt: skip
    print(f"  pause {pause * 1000:.0f} ms   reference (stop-and-copy: a local save alone) "
          f"{m['save_pause_seconds'] * 1000:.0f} ms   ratio {pause / m['save_pause_seconds']:.3f}"
          f"   (target: QEMU's downtime limit 300 ms: {pause / 0.3:.2f} of it)")  # fmt: skip
    print(f"  total {total:.2f}s   floor (the same bytes over loopback TCP) "
          f"{m['wire_seconds']:.2f}s   ratio {total / max(m['wire_seconds'], 1e-6):.1f}")  # fmt: skip
    print(f"  of which: destination QEMU listening {m['listen_seconds']:.2f}s, stream "
          f"{m['stream_seconds']:.2f}s, resume + agent {m['resume_seconds']:.2f}s")  # fmt: skip


if __name__ == "__main__":
    main()
