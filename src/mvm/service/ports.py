"""Port forwards of a sandbox, through the policy: add (wildcard and count rules, as at
create), list, remove, and binding them again after a reattach or a restore."""

from __future__ import annotations

import logging

from mvm import names
from mvm.api import models as M
from mvm.daemon.forwards import check_spec
from mvm.service.core import Core
from mvm.service.live import Live

log = logging.getLogger(__name__)


class Ports:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def add(self, name: str, spec: M.PortSpec) -> M.ForwardInfo:
        core = self.core
        live = core.serving(name)
        spec = check_spec(spec)  # a wildcard address needs allow_wildcard on the request...
        existing = len(core.forwards.infos(live.rec.id))
        core.gate.forward(  # ...and allow_wildcard_ports in the policy, as at create
            live.name, (spec.host, spec.host_port, spec.guest_port, spec.allow_wildcard), existing
        )
        fwd = await core.forwards.add(live.rec.id, live.name, spec)
        live.forwards = core.forwards.infos(live.rec.id)
        live.note(f"forward {fwd.host}:{fwd.host_port} -> guest port {fwd.guest_port}")
        return fwd

    def all(self, name: str) -> list[M.ForwardInfo]:
        live = self.core.get(name)
        return self.core.forwards.infos(live.rec.id)

    async def remove(self, name: str, forward_id: str) -> M.ForwardInfo:
        names.check("forward", forward_id)
        live = self.core.get(name)
        fwd = await self.core.forwards.remove(live.rec.id, forward_id)
        live.forwards = self.core.forwards.infos(live.rec.id)
        return fwd

    async def restore(self, live: Live) -> list[str]:
        """Bind the sandbox's stored forwards again (after a reattach or a snapshot
        restore), or forget them if it has no VM. Returns what could not be bound."""
        core = self.core
        if live.rec.state not in ("running", "paused") or live.vm is None:
            await core.forwards.remove_all(live.rec.id)
            return []
        problems = await core.forwards.restore(live.rec.id)
        for problem in problems:
            log.warning("sandbox %s: %s", live.name, problem)
            live.note(problem)
        live.forwards = core.forwards.infos(live.rec.id)
        return problems
