"""The template lock: held across processes (flock), waited for without blocking the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mvm import templates
from mvm.errors import VMError


def test_waiting_for_a_template_lock_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """The holder is released by another task of the same loop while the waiter waits: a
    wait that blocked the loop would never let that task run (the test would hang, bounded
    by its timeout), so the order below is only reached with a free loop."""
    store = templates.TemplateStore(tmp_path)
    order: list[str] = []

    async def main() -> None:
        started = asyncio.Event()
        release = asyncio.Event()
        waiting = asyncio.Event()

        async def holder() -> None:
            async with store.lock("k"):
                started.set()
                order.append("holder in")
                await release.wait()  # e.g. awaiting the template's boot on this loop
                order.append("holder out")

        async def waiter() -> None:
            waiting.set()  # no await before the lock: main runs again only once it waits
            async with store.lock("k"):
                order.append("waiter in")

        h = asyncio.create_task(holder())
        await started.wait()
        w = asyncio.create_task(waiter())
        await waiting.wait()
        for _ in range(3):
            await asyncio.sleep(0)  # the loop keeps turning while the waiter waits
        order.append("loop free")
        release.set()
        await asyncio.wait_for(asyncio.gather(h, w), 10)

    asyncio.run(main())
    assert order == ["holder in", "loop free", "holder out", "waiter in"]


def test_a_template_lock_held_too_long_is_a_clear_error(tmp_path: Path) -> None:
    store = templates.TemplateStore(tmp_path)

    async def main() -> None:
        async with store.lock("k"), store.lock("k", timeout=0.2):
            pass

    with pytest.raises(VMError, match="stayed locked"):
        asyncio.run(main())
