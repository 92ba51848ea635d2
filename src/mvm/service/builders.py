"""Builder-kind sandboxes: the VMs image builds run in (``mvm.builder``), kept by the
service like any sandbox (state record, egress proxy, audit, logs, ``down``).

A builder sandbox is a sandbox of the ``builder`` image with four fixed-size sparse disks
in its run directory (``builder_disks``: derived from the record alone, so an mvmd restart
reattaches it), network only through the service's egress proxy (``registries`` plus the
hosts a build declares), never served by the pool. Its TTL is its idle time: a builder
nobody claims is downed by the reaper like any expired sandbox.

One build per builder: ``claim`` hands a running, unclaimed builder to one build (or boots
one), ``release`` downs it afterwards — a ``RUN`` step is root in it and could taint the
next build — and, when it was kept warm, boots a fresh one in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mvm import state
from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError, SandboxStateError
from mvm.service.live import audit_after, info
from mvm.state import SandboxRecord
from mvm.vm import new_id

if TYPE_CHECKING:
    from mvm.service.live import Live
    from mvm.service.sandboxes import Sandboxes

KIND = "builder"
IMAGE = "builder"
#: (file in the run directory, read-only to the guest, virtio serial, size). Sparse:
#: only what a build writes takes space; the driver sizes its file systems by the build.
DISKS: tuple[tuple[str, bool, str, int], ...] = (
    ("input.img", True, "mvminput", 16 << 30),
    ("context.img", True, "mvmcontext", 1 << 30),
    ("scratch.img", False, "mvmscratch", 64 << 30),
    ("output.img", False, "mvmoutput", 16 << 30),
)
CPUS, MEMORY_MB = 1, 1024


#: Seconds an unclaimed builder stays up (its TTL); ``MVM_BUILDER_IDLE``, ``--idle``.
#: 0: a builder is never kept warm (each build boots one and nothing is left running).
def default_idle() -> float:
    try:
        return float(os.environ.get("MVM_BUILDER_IDLE", "600"))
    except ValueError:
        return 600.0


#: A claimed builder's TTL: the longest build (``MVM_BUILD_TIMEOUT``) plus slack.
CLAIM_TTL = float(os.environ.get("MVM_BUILD_TIMEOUT", "7200")) + 600.0
IDLE_TAG = "mvm.builder.idle"


class BuilderRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``up`` and ``claim``: the extra hosts the builder's egress allows (beside the
    ``registries`` preset) and its idle time (None: ``default_idle()``)."""

    allow: list[str] = []
    idle_seconds: float | None = None


class BuilderInfo(msgspec.Struct, kw_only=True):
    sandbox: M.SandboxInfo
    run_dir: str
    #: A build holds it (one build per builder; it is downed when the build ends).
    claimed: bool = False
    idle_seconds: float = 0.0


class Claimed(msgspec.Struct, kw_only=True):
    name: str
    id: str
    run_dir: str
    #: Seconds this claim spent booting the builder (0: a warm one was waiting).
    boot_seconds: float = 0.0


def builder_disks(rec: SandboxRecord) -> tuple[tuple[Path, bool, str], ...]:
    """The extra disks of a builder-kind record (none for any other kind), made sparse in
    its run directory when missing: the same paths on create and on reattach."""
    if rec.kind != KIND:
        return ()
    d = Path(rec.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, ro, serial, size in DISKS:
        p = d / name
        if not p.exists():
            with p.open("wb") as f:
                f.truncate(size)
        out.append((p, ro, serial))
    return tuple(out)


def _allow_key(allow: list[str]) -> tuple[str, ...]:
    return tuple(sorted(set(allow)))


class Builders:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        self.core = sandboxes.core
        self.claimed: set[str] = set()
        self._lock = asyncio.Lock()
        #: Builders booting in the background, by allow list (a claim waits for one).
        self._booting: dict[tuple[str, ...], asyncio.Task[Live | None]] = {}

    def _mine(self) -> list[Live]:
        """The host owner's builders: a tenant's sandbox (``mvmctl serve`` relays creates
        of any kind) is never handed to the owner's builds."""
        return [
            live
            for live in sorted(self.core.live.values(), key=lambda x: x.rec.created)
            if live.rec.kind == KIND and live.rec.tenant is None and live.rec.image == IMAGE
        ]

    def all(self) -> list[BuilderInfo]:
        return [
            BuilderInfo(
                sandbox=info(live),
                run_dir=live.rec.run_dir,
                claimed=live.name in self.claimed,
                idle_seconds=_idle_of(live.rec),
            )
            for live in self._mine()
        ]

    async def up(self, req: BuilderRequest) -> Live:
        """A builder sandbox, kept for ``idle_seconds`` unless a build claims it."""
        idle = default_idle() if req.idle_seconds is None else req.idle_seconds
        if idle <= 0:
            raise InvalidArgument("a warm builder needs an idle time above 0 seconds")
        create = M.CreateSandbox(
            name=f"builder-{new_id()[:8]}",
            image=IMAGE,
            kind=KIND,
            cpus=CPUS,
            memory_mb=MEMORY_MB,
            ttl_seconds=idle,
            network=M.NetworkSpec(preset="registries", allow=list(_allow_key(req.allow))),
            tags={IDLE_TAG: f"{idle:g}"},
        )
        live = await self.sandboxes.create(create)
        if live.name not in self.claimed:  # idle counts from when it is ready
            live.rec = self.core.db.update(live.rec, expires_at=time.time() + idle)
        return live

    async def claim(self, req: BuilderRequest) -> Claimed:
        """A running builder for one build: a warm one of the same egress, else one booted
        now. Its TTL becomes the build's limit until ``release``."""
        key = _allow_key(req.allow)
        pending = self._booting.get(key)
        if pending is not None:  # a replacement on its way: wait rather than boot another
            with contextlib.suppress(MvmError, asyncio.CancelledError):
                await asyncio.shield(pending)
        async with self._lock:
            for live in self._mine():
                if (
                    live.name not in self.claimed
                    and live.rec.state == state.RUNNING
                    and tuple(live.rec.network.allow) == key
                ):
                    return self._take(live, 0.0)
            t0 = time.monotonic()
            idle = default_idle() if req.idle_seconds is None else req.idle_seconds
            live = await self.up(BuilderRequest(allow=list(key), idle_seconds=max(idle, 1.0)))
            # Booted for this build: it is not kept unless idle time says so.
            if idle <= 0:
                live.rec = self.core.db.update(live.rec, tags={IDLE_TAG: "0"})
            return self._take(live, time.monotonic() - t0)

    def _take(self, live: Live, boot_seconds: float) -> Claimed:
        self.claimed.add(live.name)
        live.rec = self.core.db.update(
            live.rec, ttl_seconds=CLAIM_TTL, expires_at=time.time() + CLAIM_TTL
        )
        audit_after("builder.claimed", live.name, id=live.rec.id, warm=boot_seconds == 0.0)
        return Claimed(
            name=live.name, id=live.rec.id, run_dir=live.rec.run_dir, boot_seconds=boot_seconds
        )

    async def release(self, name: str) -> M.SandboxInfo:
        """Down a claimed builder after its build; boot a fresh one in the background when
        it was kept warm (idle time above 0)."""
        live = self.core.get(name)
        if live.rec.kind != KIND:  # claimed or not: an mvmd restart forgets the claims
            raise SandboxStateError(f"{name} is not a builder", sandbox=name)
        idle, allow = _idle_of(live.rec), list(live.rec.network.allow)
        try:
            out = await self.sandboxes.down(name, reason="build done")
        finally:
            self.claimed.discard(name)
        if idle > 0:
            self._replace(allow, idle)
        return out

    def _replace(self, allow: list[str], idle: float) -> None:
        key = _allow_key(allow)
        if key in self._booting and not self._booting[key].done():
            return

        async def boot() -> Live | None:
            try:
                return await self.up(BuilderRequest(allow=allow, idle_seconds=idle))
            except MvmError:
                return None  # audited as sandbox.failed by create; the next build boots one
            finally:
                self._booting.pop(key, None)

        self._booting[key] = asyncio.get_running_loop().create_task(boot())

    async def close(self) -> None:
        for task in list(self._booting.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _idle_of(rec: SandboxRecord) -> float:
    try:
        return float(rec.tags.get(IDLE_TAG, "0"))
    except ValueError:
        return 0.0
