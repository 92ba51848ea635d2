"""Health: mvmd notices a running sandbox whose guest agent stopped answering.

Every CHECK_EVERY seconds, each running sandbox whose agent sent nothing for PING_AFTER
seconds (any frame counts: exec output, events, replies) gets one ping, bounded by
PING_TIMEOUT. A sandbox whose agent has sent nothing for UNRESPONSIVE_AFTER seconds (of
being watched while running: a resumed sandbox starts a fresh count) is flagged
``unresponsive`` with the reason — a flag, not a state: it stays ``running`` (the guest may
come back: a stopped QEMU, a fork bomb, a loaded host), so the reaper does not fail it
and ``wait`` keeps waiting; the TTL still applies. The flag clears as soon as the agent
answers again. Both changes are noted in the sandbox's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mvm import state
from mvm.service.core import Core
from mvm.service.live import Live

log = logging.getLogger(__name__)

CHECK_EVERY = 2.5
PING_AFTER = 5.0
PING_TIMEOUT = 2.0
UNRESPONSIVE_AFTER = 15.0


class Health:
    def __init__(self, core: Core) -> None:
        self.core = core
        #: sandbox id -> time.monotonic() when it was first seen running (this stretch).
        self._watched: dict[str, float] = {}

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                await self.check_once()
            except Exception:  # the checker must never die
                log.exception("health pass failed")

    async def check_once(self) -> None:
        now = time.monotonic()
        watched: list[Live] = []
        for live in list(self.core.live.values()):
            agent = live.vm.agent if live.vm is not None else None
            if live.rec.state != state.RUNNING or agent is None or agent.failure is not None:
                self._watched.pop(live.rec.id, None)
                live.unresponsive = None
                continue
            self._watched.setdefault(live.rec.id, now)
            watched.append(live)
        alive_ids = {live.rec.id for live in self.core.live.values()}
        for gone in set(self._watched) - alive_ids:
            del self._watched[gone]
        await asyncio.gather(
            *(self._ping(live) for live in watched if self._quiet(live) >= PING_AFTER)
        )
        for live in watched:
            quiet = self._quiet(live)
            if quiet >= UNRESPONSIVE_AFTER and live.unresponsive is None:
                live.unresponsive = (
                    f"the guest agent has not answered for {quiet:.0f}s "
                    f"(pinged every {PING_AFTER:g}s, {PING_TIMEOUT:g}s timeout)"
                )
                log.warning("sandbox %s is unresponsive", live.name)
                live.note(f"unresponsive: {live.unresponsive}")
            elif quiet < UNRESPONSIVE_AFTER and live.unresponsive is not None:
                live.unresponsive = None
                live.note("the guest agent answers again")

    def _quiet(self, live: Live) -> float:
        """Seconds since the agent last sent anything (counted from when watching began)."""
        agent = live.vm.agent if live.vm is not None else None
        if agent is None:
            return 0.0
        since = max(agent.last_heard, self._watched.get(live.rec.id, agent.last_heard))
        return time.monotonic() - since

    async def _ping(self, live: Live) -> None:
        agent = live.vm.agent if live.vm is not None else None
        if agent is None:
            return
        # The outer bound also covers a write that blocks on a full socket buffer.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(PING_TIMEOUT + 1.0):
                await agent.ping(PING_TIMEOUT)
