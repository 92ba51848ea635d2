"""Fork: children of a running sandbox with its memory, files and processes as they are.

One snapshot of the source (its CPUs stand still only while it is written), then each
child is a new VM loaded from it. A child is a sandbox of its own: a new id and name,
admission and an audit record (``sandbox.forked``, naming the parent) each, its own
egress proxy with the parent's policy, its secrets resolved again, no forwards (host
ports would clash), and a fresh clock and entropy from the agent's hello handshake.

Restoring a snapshot under a new name ("restore elsewhere") is the same mechanism.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from pathlib import Path

from mvm import forkvm, names, paths, state
from mvm.api import fork as F
from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError, SandboxStateError, VMError
from mvm.images.store import Image
from mvm.policy import admission
from mvm.service.core import Core, new_record, spec_for
from mvm.service.live import Live, audit_after, info, reason_fields
from mvm.service.sandboxes import Sandboxes
from mvm.service.snapshots import Snapshots
from mvm.vm import MicroVM, new_id


class Fork:
    def __init__(self, core: Core, sandboxes: Sandboxes, snapshots: Snapshots) -> None:
        self.core = core
        self.sandboxes = sandboxes
        self.snapshots = snapshots

    async def fork(self, name: str, req: F.ForkRequest) -> F.ForkResult:
        """Snapshot running sandbox ``name`` once and start ``req.count`` children from it."""
        core = self.core
        if not 1 <= req.count <= F.MAX_CHILDREN:
            raise InvalidArgument(f"count must be 1 to {F.MAX_CHILDREN} (got {req.count})")
        kids = [names.check("sandbox", n) for n in F.child_names(req.name, req.count)]
        started = time.monotonic()
        live, _ = core.running(name)
        parent = live.rec
        image = core.image_for(parent)
        for kid in kids:  # every child is a launch: refused before anything is paused
            core.gate.launch(kid, admission.plan_from_shape(parent))
        core.resolve_secrets(None, parent.secret_env)  # a removed secret fails here
        work = paths.run_dir() / f"fork-{secrets.token_hex(4)}"
        work.mkdir(parents=True)
        try:
            t0 = time.monotonic()
            assert live.vm is not None
            # One copy of the snapshot's memory (a loader QEMU's shared RAM file), mapped
            # copy-on-write by every child; the source streams straight into it.
            forkvm.place_ram(work / "img", live.vm.spec.memory_mb)
            loader = await forkvm.start_loader(live.vm.spec, work / "img", core.store)
            try:
                async with live.lock:
                    live, _ = core.running(name)
                    assert live.vm is not None
                    t1 = time.monotonic()
                    paused = await forkvm.stream_into(live.vm, loader)
            except BaseException:
                await loader.stop()
                raise
            live.note(f"forked into {', '.join(kids)} (paused {paused:.3f}s)")
            await forkvm.finish_image(loader, work / "img")  # stops the loader
            t2 = time.monotonic()
            results = await asyncio.gather(
                *(self._child(parent, image, work / "img", kid, cow=True) for kid in kids),
                return_exceptions=True,
            )
            stages = {
                "loader": round(t1 - t0, 4),
                "snapshot": round(t2 - t1, 4),
                "children": round(time.monotonic() - t2, 4),
            }
        finally:
            forkvm.remove_ram(work / "img")
            shutil.rmtree(work, ignore_errors=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        children = [r for r in results if isinstance(r, Live)]
        for child in children:
            child.audit_id = audit_after(
                "sandbox.forked",
                child.name,
                id=child.rec.id,
                parent=parent.name,
                parent_id=parent.id,
                pause_seconds=round(paused, 3),
            )
        if failed:
            for child in children:  # all or nothing: no half a fork left behind
                await self.sandboxes.down(child.name, reason="fork failed")
            exc = failed[0]
            if isinstance(exc, MvmError):
                raise exc
            raise VMError(f"fork of {name} failed: {exc!r}") from exc
        return F.ForkResult(
            source=parent.name,
            pause_seconds=round(paused, 4),
            seconds=round(time.monotonic() - started, 4),
            stages=stages,
            children=[info(c) for c in children],
        )

    async def restore_as(self, name: str, snap: str, new: str) -> M.SandboxInfo:
        """Start snapshot ``snap`` of ``name`` as a new sandbox ``new`` (a child of it)."""
        new = names.check("sandbox", new)
        srec = self.snapshots._snapshot(name, snap)
        image = self.snapshots._image_for_snapshot(srec)
        self.core.gate.launch(new, admission.plan_from_shape(srec))
        self.core.resolve_secrets(None, srec.secret_env)
        child = await self._child(srec, image, Path(srec.path) / "state", new)
        child.audit_id = audit_after(
            "sandbox.forked", new, id=child.rec.id, parent=name, snapshot=snap
        )
        return info(child)

    async def _child(
        self, shape: M.SandboxShape, image: Image, st: Path, name: str, *, cow: bool = False
    ) -> Live:
        """A new sandbox of ``shape`` loaded from saved state ``st`` (with ``cow``, a
        ``forkvm.make_image`` directory): its own record, run directory, egress proxy and
        secrets; no forwards."""
        core = self.core
        vm_id = new_id()
        rec = new_record(
            M.shape_fields(shape) | {"ports": []},
            vm_id=vm_id,
            name=name,
            image_id=image.id,
            ttl_seconds=shape.ttl_seconds,
        )
        live = await self.sandboxes.insert(rec)
        async with live.lock:
            try:
                core.resolve_secrets(live, rec.secret_env)
                network = await core.start_egress(live)
                spec = spec_for(rec, image, network)
                if cow:
                    vm = await forkvm.start_child(spec, st, core.store, vm_id, Path(rec.run_dir))
                else:
                    vm = await MicroVM.load(
                        spec, st, store=core.store, vm_id=vm_id, run_dir=Path(rec.run_dir)
                    )
            except BaseException as exc:
                await self.sandboxes.forget(live)
                audit_after("sandbox.failed", name, id=vm_id, **reason_fields(f"fork: {exc!r}"))
                raise
            self.sandboxes.serve(live, vm)
            live.note(f"forked; running in {vm.boot_seconds:.2f}s")
        if live.rec.state != state.RUNNING:
            raise SandboxStateError(f"child {name} is {live.rec.state}", sandbox=name)
        return live
