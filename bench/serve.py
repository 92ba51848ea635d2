"""`mvmctl serve` under load: TCP (tokens, tenant mapping, relay) vs mvmd's Unix socket.

Run: ``.venv/bin/python bench/serve.py [--clients N] [--execs N] [--burst N] [--json]``

In one private, throw-away ``MVM_HOME`` (``/tmp/mvbs-*``, images shared with the default
store): mvmd, a token, and `mvmctl serve` on a free loopback port. Then, for each
transport in turn (Unix socket, TCP):

1. ``--clients`` concurrent clients each create a sandbox, run ``--execs`` execs of
   ``true`` in it and kill it: latency of each call (p50/p99) and calls per second;
2. 8 concurrent clients × 50 sandbox-info requests (the cost of the door itself);
3. ``--burst`` concurrent connections (default 300, above the server's bounds of 256 in
   flight, 200 per tenant) each hold a request (``wait?timeout=3``, no guest work): every one must be
   answered 200 or 429 (nothing lost), and the server must answer afterwards.

Everything is removed at the end (also on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx

from common import default_store, err, private_home, raise_on_sigterm
from mvm import client as mvmclient
from mvm.tokens import TokenStore

IMAGE = "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def make_client(kind: str, url: str, token: str, limit: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(600.0, connect=30.0, pool=600.0)
    if kind == "unix":
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(mvmclient.socket_path()), limits=limits),
            base_url="http://mvmd/v1",
            timeout=timeout,
        )
    return httpx.AsyncClient(
        base_url=f"{url}/v1",
        headers={"Authorization": f"Bearer {token}"},
        limits=limits,
        timeout=timeout,
    )


async def one_client(
    c: httpx.AsyncClient, i: int, kind: str, execs: int, lat: dict[str, list[float]]
) -> None:
    async def timed(op: str, method: str, url: str, **kw: Any) -> httpx.Response:
        t = time.perf_counter()
        r = await c.request(method, url, **kw)
        lat.setdefault(op, []).append(time.perf_counter() - t)
        if r.status_code >= 400:
            raise RuntimeError(f"{op}: HTTP {r.status_code} {r.text[:200]}")
        return r

    name = f"bench-{kind}-{i}"
    await timed("create", "POST", "/sandboxes", json={"name": name, "image": IMAGE})
    try:
        for _ in range(execs):
            r = await timed(
                "exec", "POST", f"/sandboxes/{name}/exec", json={"argv": ["true"], "timeout": 60}
            )
            assert b'"exit"' in r.content
    finally:
        await timed("kill", "DELETE", f"/sandboxes/{name}")


async def lifecycle(kind: str, url: str, token: str, clients: int, execs: int) -> dict[str, Any]:
    lat: dict[str, list[float]] = {}
    async with make_client(kind, url, token, clients * 2) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c, i, kind, execs, lat) for i in range(clients)))
        wall = time.perf_counter() - t0
    n = sum(len(v) for v in lat.values())
    out: dict[str, Any] = {"requests": n, "wall_s": round(wall, 3), "req_per_s": round(n / wall, 2)}
    for op, xs in lat.items():
        out[op] = {
            "n": len(xs),
            "p50_ms": round(pct(xs, 50) * 1000, 1),
            "p99_ms": round(pct(xs, 99) * 1000, 1),
            "mean_ms": round(statistics.fmean(xs) * 1000, 1),
        }
    return out


async def light(
    kind: str, url: str, token: str, name: str, workers: int, each: int
) -> dict[str, Any]:
    """Cheap requests (sandbox info): the cost of the door itself."""
    lat: list[float] = []
    async with make_client(kind, url, token, workers) as c:

        async def worker() -> None:
            for _ in range(each):
                t = time.perf_counter()
                r = await c.get(f"/sandboxes/{name}")
                lat.append(time.perf_counter() - t)
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "req_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(pct(lat, 50) * 1000, 2),
        "p99_ms": round(pct(lat, 99) * 1000, 2),
    }


async def burst(kind: str, url: str, token: str, n: int, name: str) -> dict[str, Any]:
    async with make_client(kind, url, token, n + 10) as c:
        t0 = time.perf_counter()
        rs = await asyncio.gather(
            *(c.post(f"/sandboxes/{name}/wait", params={"timeout": 3}) for _ in range(n)),
            return_exceptions=True,
        )
        wall = time.perf_counter() - t0
        codes = Counter(
            r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in rs
        )
        alive = (await c.get("/sandboxes")).status_code == 200
    lost = sum(v for k, v in codes.items() if k not in (200, 429))
    return {
        "connections": n,
        "codes": dict(codes),
        "lost": lost,
        "alive_after": alive,
        "wall_s": round(wall, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--execs", type=int, default=10)
    ap.add_argument("--burst", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    raise_on_sigterm()
    report: dict[str, Any] = {"clients": args.clients, "execs": args.execs}
    with private_home(default_store(), "mvbs-") as home:
        with mvmclient.Client() as c:
            c.ensure_daemon()
        token, _ = TokenStore().create("bench")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = (home / "serve.log").open("wb")
        srv = subprocess.Popen(
            [sys.executable, "-m", "mvm.cli.main", "serve", "--listen", f"127.0.0.1:{port}"],
            env=os.environ.copy(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/v1/status", timeout=2).status_code == 401:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("mvmctl serve did not start")
                time.sleep(0.2)
            for kind in ("unix", "tcp"):
                err.print(f"lifecycle over {kind}...")
                report[kind] = asyncio.run(lifecycle(kind, url, token, args.clients, args.execs))
            with mvmclient.Client() as c:
                from mvm.api import models as M
                from mvm.tenancy import to_service

                c.create(M.CreateSandbox(name=to_service("bench", "holder"), image=IMAGE))
            holders = (("unix", to_service("bench", "holder")), ("tcp", "holder"))
            for kind, name in holders:
                err.print(f"info requests over {kind}...")
                report[f"light_{kind}"] = asyncio.run(light(kind, url, token, name, 8, 50))
            for kind, name in holders:
                err.print(f"{args.burst} concurrent connections over {kind}...")
                report[f"burst_{kind}"] = asyncio.run(burst(kind, url, token, args.burst, name))
            report["server_alive"] = srv.poll() is None
        finally:
            srv.terminate()
            try:
                srv.wait(20)
            except subprocess.TimeoutExpired:
                srv.kill()
            log.close()
    print(json.dumps(report, indent=None if args.json else 2))
    ok = all(report[f"burst_{k}"]["lost"] == 0 for k in ("unix", "tcp")) and report["server_alive"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
