"""The front's view of the cluster: hosts (their actors, relays, capacity), which host
owns which sandbox, and which sandboxes were lost with a host.

Hosts are found through Ray: every live node offering a ``mvmhost:<name>`` resource gets
one :class:`~mvm.cluster.host.HostAgent` pinned to it. A host whose actor dies (or stops
answering) is *lost*: its sandboxes are reported ``lost`` with the reason and nothing is
placed there until it rejoins — a new node offering its resource (``mvmctl cluster
join``), or ``POST /v1/cluster/hosts/NAME/rejoin`` for a node that is still up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from mvm.cluster.host import HostAgent
from mvm.cluster.placement import Capacity

log = logging.getLogger(__name__)
RESOURCE_PREFIX = "mvmhost:"
#: Seconds between capacity reports; missed reports before a live actor counts as lost.
HEALTH_EVERY = 2.0
MISSES_LOST = 5
REPORT_TIMEOUT = 30.0


@dataclass
class Host:
    name: str
    node_id: str
    actor: Any = None
    url: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    cap: Capacity = field(default_factory=lambda: Capacity(name=""))
    report: dict[str, Any] = field(default_factory=dict)
    sandboxes: dict[str, dict[str, Any]] = field(default_factory=dict)
    lost: str = ""  # why, when lost
    misses: int = 0
    placed: int = 0  # creates sent since the last report (reports lag)

    @property
    def alive(self) -> bool:
        return not self.lost and bool(self.url)


@dataclass
class Lost:
    host: str
    reason: str
    since: float
    info: dict[str, Any]


class Registry:
    def __init__(self, key: str, homes: dict[str, str] | None = None, bind: str = "") -> None:
        self.key = key
        self.homes = homes or {}
        self.bind = bind
        self.hosts: dict[str, Host] = {}
        self.owner: dict[str, str] = {}  # sandbox (mvmd name) -> host
        self.lost: dict[str, Lost] = {}
        self.pending: set[str] = set()
        #: Sandboxes being migrated -> the host serving them until the move is done (the
        #: destination lists them as creating meanwhile: calls still go to the source).
        self.moving: dict[str, str] = {}
        self._starting: set[str] = set()
        self._agent: Any = ray.remote(HostAgent)

    # -- membership ---------------------------------------------------------------------
    async def discover(self) -> None:
        """Start an actor for every host resource on a live node not served yet (new,
        or lost and now on a new node)."""
        nodes = await asyncio.to_thread(ray.nodes)
        for n in nodes:
            if not n.get("Alive"):
                continue
            for res in n.get("Resources", {}):
                if not res.startswith(RESOURCE_PREFIX):
                    continue
                name = res[len(RESOURCE_PREFIX) :]
                h = self.hosts.get(name)
                fresh = h is None or (h.lost and h.node_id != n["NodeID"])
                if fresh and name not in self._starting:
                    addr = self.bind or str(n.get("NodeManagerAddress") or "127.0.0.1")
                    await self.start_host(name, str(n["NodeID"]), addr)

    async def start_host(self, name: str, node_id: str, addr: str) -> Host:
        self._starting.add(name)
        try:
            actor = self._agent.options(
                resources={f"{RESOURCE_PREFIX}{name}": 0.001}, num_cpus=0, max_restarts=0
            ).remote(name, self.homes.get(name), self.key, addr)
            info = await asyncio.wait_for(actor.start.remote(), 120.0)
            h = Host(name=name, node_id=node_id, actor=actor, url=info["url"], info=info)
            old = self.hosts.get(name)
            if old is not None:
                h.sandboxes = old.sandboxes
            self.hosts[name] = h
            await self.report(h)
            log.info("host %s joined at %s", name, h.url)
            return h
        finally:
            self._starting.discard(name)

    async def rejoin(self, name: str) -> Host:
        h = self.hosts.get(name)
        if h is None:
            raise KeyError(name)
        if h.actor is not None and not h.lost:
            return h
        addr = self.bind or h.url.split("//", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
        return await self.start_host(name, h.node_id, addr)

    def mark_lost(self, h: Host, reason: str) -> None:
        if h.lost:
            return
        h.lost = reason[:300] or "host lost"
        now = time.time()
        for sb, info in h.sandboxes.items():
            self.lost[sb] = Lost(h.name, h.lost, now, info)
            if self.owner.get(sb) == h.name:
                del self.owner[sb]
        log.warning("host %s lost: %s", h.name, h.lost)
        if h.actor is not None:
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:
                pass

    # -- reports ------------------------------------------------------------------------
    async def report(self, h: Host) -> None:
        """One capacity report (and listing) from ``h``; lost after repeated silence."""
        try:
            rep = await asyncio.wait_for(h.actor.capacity.remote(), REPORT_TIMEOUT)
        except ray.exceptions.RayActorError as exc:
            self.mark_lost(h, f"host actor died: {str(exc).splitlines()[0][:200]}")
            return
        except (TimeoutError, ray.exceptions.RayError) as exc:
            h.misses += 1
            if h.misses >= MISSES_LOST:
                self.mark_lost(h, f"no capacity report in {h.misses} tries: {exc!r}"[:200])
            return
        h.misses = 0
        h.report = rep
        h.placed = 0
        h.cap = Capacity(
            name=h.name,
            free_mb=int(rep["free_mb"]),
            vcpus=int(rep["vcpus"]),
            running=int(rep["running"]),
            images=list(rep["images"]),
            warm=list(rep["warm"]),
        )
        self.set_listing(h, rep.get("listed", []))

    def set_listing(self, h: Host, listed: list[dict[str, Any]]) -> None:
        h.sandboxes = {str(s["name"]): s for s in listed if isinstance(s, dict)}
        for sb in h.sandboxes:
            self.lost.pop(sb, None)
            self.owner[sb] = self.moving.get(sb, h.name)
        for sb, owner in list(self.owner.items()):
            gone = sb not in h.sandboxes and sb not in self.pending and sb not in self.moving
            if owner == h.name and gone:
                del self.owner[sb]

    async def health_loop(self) -> None:
        while True:
            try:
                await self.discover()
                live = [h for h in self.hosts.values() if h.alive]
                await asyncio.gather(*(self.report(h) for h in live))
            except Exception:
                log.exception("cluster health loop")
            await asyncio.sleep(HEALTH_EVERY)

    def capacities(self) -> list[Capacity]:
        out = []
        for h in self.hosts.values():
            c = Capacity(**{**h.cap.__dict__, "name": h.name, "alive": h.alive})
            c.running += h.placed
            out.append(c)
        return out

    def status(self) -> dict[str, Any]:
        return {
            "hosts": [
                {
                    "name": h.name,
                    "alive": h.alive,
                    "lost": h.lost,
                    "url": h.url,
                    "node_id": h.node_id,
                    "actor_pid": h.info.get("pid"),
                    "mvmd_pid": h.info.get("mvmd_pid"),
                    "home": h.info.get("home"),
                    "capacity": {k: v for k, v in h.report.items() if k != "listed"},
                    "sandboxes": sorted(h.sandboxes) if h.alive else [],
                }
                for h in sorted(self.hosts.values(), key=lambda h: h.name)
            ],
            "lost": {k: {"host": v.host, "reason": v.reason} for k, v in self.lost.items()},
        }

    async def stop(self, remove_sandboxes: bool) -> None:
        live = [h for h in self.hosts.values() if h.alive]
        await asyncio.gather(
            *(asyncio.wait_for(h.actor.stop.remote(remove_sandboxes), 180) for h in live),
            return_exceptions=True,
        )
