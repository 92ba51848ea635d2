"""The async SDK's thread pool: more calls at once than asyncio's default executor has
threads on a small host, and context variables carried like ``asyncio.to_thread``."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from mvm.sdk import threads

LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("label", default="none")


def test_more_calls_run_at_once_than_the_default_executor_has_threads() -> None:
    n = 12  # asyncio's default: min(32, cpus + 4) = 6 on a 2-core host
    barrier = threading.Barrier(n, timeout=30)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(threads.to_thread(barrier.wait) for _ in range(n))))

    # Each call returns only once all n are waiting at the barrier together.
    assert sorted(asyncio.run(main())) == list(range(n))


def test_context_variables_go_along() -> None:
    async def main() -> str:
        LABEL.set("mcp:agent")
        return await threads.to_thread(LABEL.get)

    assert asyncio.run(main()) == "mcp:agent"
