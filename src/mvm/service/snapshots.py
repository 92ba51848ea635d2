"""Snapshots: save a sandbox's whole state, list and remove them, restore one into the
sandbox (replacing its VM) or, when the sandbox was removed, recreate it from one.

A recreate is a launch: it goes through admission like a create, and its forwards come
back (each through the forward policy); a forward that cannot is named in ``warnings``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec

from mvm import names, paths, state
from mvm.api import models as M
from mvm.errors import SandboxNotFound, SnapshotExists, SnapshotNotFound
from mvm.images.store import Image
from mvm.policy import admission
from mvm.service.core import Core, new_record, spec_for
from mvm.service.live import Live, audit_after, info
from mvm.service.ports import Ports
from mvm.service.sandboxes import Sandboxes
from mvm.state import SnapshotRecord
from mvm.vm import MicroVM, new_id


def snapshots_dir() -> Path:
    return paths.home() / "snapshots"


def snap_info(s: SnapshotRecord, audit_id: str | None = None) -> M.SnapshotInfo:
    return M.SnapshotInfo(
        sandbox=s.sandbox,
        name=s.name,
        created=s.created,
        size=s.size,
        image=s.image,
        audit_id=audit_id,
    )


class Snapshots:
    def __init__(self, core: Core, sandboxes: Sandboxes, ports: Ports) -> None:
        self.core = core
        self.sandboxes = sandboxes
        self.ports = ports

    async def save(self, name: str, snap: str) -> M.SnapshotInfo:
        names.check("snapshot", snap)
        core = self.core
        live = core.serving(name)
        async with live.lock:  # the name check and the save are one step
            if core.db.snapshot(live.name, snap) is not None:
                raise SnapshotExists(
                    f"{name} already has a snapshot {snap!r}",
                    hint=f"remove it: mvmctl snapshot rm {name} {snap}",
                    sandbox=name,
                    snapshot=snap,
                )
            live = core.serving(name)
            assert live.vm is not None
            d = snapshots_dir() / live.name / snap
            tmp = d.with_name(f".tmp-{snap}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                await live.vm.save(tmp / "state", keep_running=live.rec.state == state.RUNNING)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
            r = live.rec
            ports = [
                M.PortSpec(
                    guest_port=f.guest_port,
                    host_port=f.host_port,
                    host=f.host,
                    allow_wildcard=f.wildcard,
                )
                for f in core.db.forwards(r.id)
            ]
            srec = SnapshotRecord(
                **M.shape_fields(r) | {"secret_env": {}, "ports": ports},  # type: ignore[arg-type]
                sandbox=r.name,
                name=snap,
                path=str(d),
                created=time.time(),
                size=(d / "state").stat().st_size,
                image_id=r.image_id,
            )
            (d / "snapshot.json").write_bytes(msgspec.json.encode(srec))
            core.db.add_snapshot(srec)
            live.note(f"snapshot {snap} saved ({srec.size} bytes)")
        aid = audit_after(
            "snapshot.saved", srec.sandbox, snapshot=srec.name, size=srec.size, image=srec.image
        )
        return snap_info(srec, aid)

    def all(self, name: str) -> list[M.SnapshotInfo]:
        names.check("sandbox", name)
        snaps = self.core.db.snapshots(name)
        if not snaps and name not in self.core.live:
            raise SandboxNotFound(f"no sandbox or snapshots named {name!r}", sandbox=name)
        return [snap_info(s) for s in snaps]

    def _snapshot(self, name: str, snap: str) -> SnapshotRecord:
        names.check("sandbox", name)
        names.check("snapshot", snap)
        rec = self.core.db.snapshot(name, snap)
        if rec is None or not (Path(rec.path) / "state").is_file():
            known = ", ".join(s.name for s in self.core.db.snapshots(name)) or "none"
            raise SnapshotNotFound(f"{name} has no snapshot {snap!r}", hint=f"snapshots: {known}")
        return rec

    async def remove(self, name: str, snap: str) -> str | None:
        rec = self._snapshot(name, snap)
        self.core.db.remove_snapshot(name, snap)
        shutil.rmtree(rec.path, ignore_errors=True)
        return audit_after("snapshot.removed", name, snapshot=snap)

    async def restore(self, name: str, snap: str) -> M.SandboxInfo:
        """Put sandbox ``name`` back to the snapshot: its VM is replaced by one loaded from
        the saved state; if the sandbox was removed, it is created again."""
        core = self.core
        srec = self._snapshot(name, snap)
        live = core.live.get(name)
        warnings: list[str] = []
        if live is None:
            live, warnings = await self._recreate_from(srec)
        else:
            async with live.lock:
                live = core.serving(name)
                assert live.vm is not None
                if live.rec.state != state.RUNNING:
                    live.rec = core.db.transition(live.rec, state.RUNNING)
                await live.vm.restore(Path(srec.path) / "state")
                core.wire(live)
                live.rec = core.db.update(live.rec, pid=live.vm.pid)
                live.note(f"restored snapshot {snap}")
        live.audit_id = audit_after("snapshot.restored", live.name, snapshot=snap, id=live.rec.id)
        out = info(live)
        out.warnings = warnings
        return out

    async def _recreate_from(self, srec: SnapshotRecord) -> tuple[Live, list[str]]:
        core = self.core
        # A recreate is a launch: the same admission as a create, from the same shape.
        core.gate.launch(srec.sandbox, admission.plan_from_shape(srec))
        image = self._image_for_snapshot(srec)
        vm_id = new_id()
        rec = new_record(
            M.shape_fields(srec),
            vm_id=vm_id,
            name=srec.sandbox,
            image_id=srec.image_id,
            ttl_seconds=srec.ttl_seconds,
        )
        live = await self.sandboxes.insert(rec)
        async with live.lock:
            try:
                network = await core.start_egress(live)
                vm = await MicroVM.load(
                    spec_for(rec, image, network),
                    Path(srec.path) / "state",
                    store=core.store,
                    vm_id=vm_id,
                    run_dir=Path(rec.run_dir),
                )
            except BaseException:
                await self.sandboxes.forget(live)
                raise
            self.sandboxes.serve(live, vm)
            live.note(f"created from snapshot {srec.name}")
        return live, await self._forwards_back(live, srec)

    async def _forwards_back(self, live: Live, srec: SnapshotRecord) -> list[str]:
        """Bind the snapshot's forwards again on the recreated sandbox; say which could not."""
        from mvm.errors import MvmError

        warnings = []
        for spec in srec.ports:
            try:
                await self.ports.add(live.name, spec)
            except MvmError as exc:
                what = f"forward {spec.host}:{spec.host_port} -> {spec.guest_port} not restored"
                warnings.append(f"{what}: {exc}")
                live.note(warnings[-1])
        return warnings

    def _image_for_snapshot(self, srec: SnapshotRecord) -> Image:
        for img in self.core.store.all():
            if img.id == srec.image_id:
                return img
        raise SnapshotNotFound(
            f"the image {srec.image} that snapshot {srec.name} was taken from is gone"
        )
