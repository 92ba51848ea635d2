"""The template lock: held across processes (flock), waited for without blocking the loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mvm import templates
from mvm.errors import VMError


def test_waiting_for_a_template_lock_does_not_block_the_event_loop(tmp_path: Path) -> None:
    store = templates.TemplateStore(tmp_path)
    order: list[str] = []

    async def holder(started: asyncio.Event) -> None:
        async with store.lock("k"):
            started.set()
            order.append("holder in")
            await asyncio.sleep(0.3)  # e.g. awaiting the template's boot on this loop
            order.append("holder out")

    async def ticker() -> int:
        ticks = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.25:
            await asyncio.sleep(0.01)
            ticks += 1
        return ticks

    async def main() -> int:
        started = asyncio.Event()
        h = asyncio.create_task(holder(started))
        await started.wait()

        async def waiter() -> None:
            async with store.lock("k"):
                order.append("waiter in")

        w = asyncio.create_task(waiter())
        ticks = await ticker()  # runs while the waiter waits: the loop is free
        await asyncio.wait_for(asyncio.gather(h, w), 10)
        return ticks

    ticks = asyncio.run(main())
    assert ticks > 5
    assert order == ["holder in", "holder out", "waiter in"]


def test_a_template_lock_held_too_long_is_a_clear_error(tmp_path: Path) -> None:
    store = templates.TemplateStore(tmp_path)

    async def main() -> None:
        async with store.lock("k"), store.lock("k", timeout=0.2):
            pass

    with pytest.raises(VMError, match="stayed locked"):
        asyncio.run(main())
