"""The async SDK's worker threads.

Every ``AsyncSandbox`` call runs the sync SDK in a thread. asyncio's default executor has
``min(32, cpus + 4)`` threads — 6 on a 2-core host — so the 7th of 8 concurrent creates
would wait for a thread, not for mvmd. These calls wait on mvmd and the guest, not the
CPU, so they get a pool of their own, sized for many sandboxes at once. Like
``asyncio.to_thread``, the caller's context variables (e.g. ``acting_as``) go along.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

#: Calls in flight at once across the process; beyond it they queue (bounded threads).
MAX_WORKERS = 64

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="mvm-sdk")
        return _pool


async def to_thread(func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """``asyncio.to_thread`` on the SDK's own pool."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, func, *args, **kwargs)
    return await loop.run_in_executor(_executor(), call)
