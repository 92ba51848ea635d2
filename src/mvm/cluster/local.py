"""The cluster's supervisor process: Ray (a local cluster of simulated hosts, or an existing
cluster to connect to), the host actors and the front, until SIGTERM.

``mvmctl cluster up`` starts it detached and waits for its state file; ``cluster down``
sends it SIGTERM (it stops the local hosts' mvmds, then Ray). One process owns everything
it started, so nothing is left behind and nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import ray
from aiohttp import web

from mvm import paths
from mvm.cluster import placement
from mvm.cluster.front import ClusterServer, RoutingUpstream
from mvm.cluster.registry import RESOURCE_PREFIX, Registry

log = logging.getLogger("mvm.cluster")
#: What a simulated host's home shares with the cluster's home (as mvmd_home does).
SHARED = ("rootfs", "kernels", "initramfs", "templates", "build.lock")


def cluster_dir() -> Path:
    return paths.home() / "cluster"


def state_file() -> Path:
    return cluster_dir() / "state.json"


def host_home(main: Path, dest: Path) -> Path:
    """A simulated host's own MVM_HOME sharing the images of ``main`` (no rebuilds)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for n in SHARED:
        link = dest / n
        if not link.exists() and not link.is_symlink():
            link.symlink_to(main / n)
    (dest / "images").mkdir(exist_ok=True)
    for rec in (main / "images").glob("*.json"):
        shutil.copy(rec, dest / "images" / rec.name)
    return dest


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = secrets.token_urlsafe(32)
        self.local: Any = None  # ray.cluster_utils.Cluster of simulated hosts
        self.nodes: dict[str, Any] = {}
        self.homes: dict[str, str] = {}
        self.reg: Registry | None = None

    def start_ray(self) -> str:
        if self.args.ray_address:
            ray.init(address=self.args.ray_address, logging_level=logging.WARNING)
            return str(self.args.ray_address)
        from ray.cluster_utils import Cluster

        self.local = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
            },
        )
        given = list(self.args.host_home or [])
        for i in range(1, self.args.local_hosts + 1):
            name = f"h{i}"
            home = (
                Path(given[i - 1])
                if i <= len(given)
                else host_home(paths.home(), cluster_dir() / "hosts" / name)
            )
            self.homes[name] = str(home)
            self.add_node(name)
        ray.init(address=self.local.address, logging_level=logging.WARNING)
        return str(self.local.address)

    def add_node(self, name: str) -> None:
        self.nodes[name] = self.local.add_node(
            num_cpus=1, resources={f"{RESOURCE_PREFIX}{name}": 1}
        )

    async def run(self, address: str) -> None:
        bind = "127.0.0.1" if self.local is not None else ""
        self.reg = reg = Registry(self.key, self.homes, bind)
        up = RoutingUpstream(reg, self.args.policy)
        server = ClusterServer(up)
        server.admin["hosts/remove-node"] = self.remove_node
        server.admin["hosts/add-node"] = self.readd_node
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        host, _, port = self.args.listen.rpartition(":")
        site = web.TCPSite(runner, host or "127.0.0.1", int(port))
        await site.start()
        real_port = int(runner.addresses[0][1])
        url = f"http://{host or '127.0.0.1'}:{real_port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            await reg.discover()
            if len([h for h in reg.hosts.values() if h.alive]) >= self.args.local_hosts:
                break
            await asyncio.sleep(0.5)
        health = asyncio.create_task(reg.health_loop())
        st = {
            "pid": os.getpid(),
            "url": url,
            "ray_address": address,
            "local_hosts": self.homes,
            "hosts": [h.name for h in reg.hosts.values() if h.alive],
        }
        write_state(st)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        health.cancel()
        await reg.stop(remove_sandboxes=self.local is not None)
        await runner.cleanup()

    # Simulated hosts only: take a host's node away and bring it back (failover tests).
    async def remove_node(self, request: web.Request, parts: list[str]) -> web.Response:
        name = request.query.get("name", "")
        if self.local is None or name not in self.nodes:
            return web.json_response({"code": 404, "message": "no such local host"}, status=404)
        self.local.remove_node(self.nodes.pop(name))  # Ray: main thread only
        return web.json_response({"removed": name})

    async def readd_node(self, request: web.Request, parts: list[str]) -> web.Response:
        name = request.query.get("name", "")
        if self.local is None or name not in self.homes or name in self.nodes:
            return web.json_response({"code": 404, "message": "no such local host"}, status=404)
        self.add_node(name)  # Ray: main thread only
        return web.json_response({"added": name})

    def shutdown(self) -> None:
        try:
            ray.shutdown()
        finally:
            if self.local is not None:
                self.local.shutdown()


def write_state(st: dict[str, Any]) -> None:
    f = state_file()
    f.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(st))
    tmp.replace(f)


def main() -> None:
    p = argparse.ArgumentParser(prog="mvm.cluster.local")
    p.add_argument("--local-hosts", type=int, default=0)
    p.add_argument("--host-home", action="append")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--policy", choices=placement.POLICIES, default="spread")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.pop("MVM_URL", None)
    sup = Supervisor(args)
    try:
        address = sup.start_ray()  # Ray's nodes set signal handlers: the main thread
        asyncio.run(sup.run(address))
    finally:
        sup.shutdown()
        state_file().unlink(missing_ok=True)


if __name__ == "__main__":
    main()
