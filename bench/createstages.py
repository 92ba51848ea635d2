"""mvmd's own share of a create, split by stage (issue 12 item 2).

The create path of ``mvm.service.SandboxService`` (what mvmd runs for ``POST
/v1/sandboxes``) is driven in-process, as ``mvm.oneshot`` does, with light timing
wrappers around the calls it makes: admission (policy gate, shape and secret checks,
network policy), image lookup, state writes (insert as CREATING, RUNNING), egress, the
VM restore itself (``MicroVM.boot``: the floor's part), audit signing (``sandbox.launched``
and the exec's two records), and the first exec. Nothing in the product changes: the
wrappers only time the calls and pass them through. Beside it, the floor: the same
template restore + ``true`` in-process without the service (``MicroVM.boot`` + agent exec).

Used by ``pool.py`` (printed beside the SDK create through mvmd of the same run); also
runnable alone: ``.venv/bin/python bench/createstages.py [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from mvm import paths
from mvm.agent.client import AgentClient
from mvm.api import models as M
from mvm.errors import MvmError
from mvm.images.store import ImageStore
from mvm.policy import admission
from mvm.service import SandboxService
from mvm.service import execs as execs_mod
from mvm.service import sandboxes as sb_mod
from mvm.state import StateDB
from mvm.vm import MicroVM, VMSpec, new_id

#: Stage names, in the order a create meets them.
STAGES = (
    "admission",
    "image lookup",
    "state writes",
    "egress",
    "VM restore (MicroVM.boot)",
    "audit: sandbox.launched",
    "audit: exec started+finished",
    "exec through the service",
)
#: Inside the exec: the guest agent's own round trip (the floor's exec part).
AGENT = "  of which the agent's exec round trip"


class Clock:
    """Accumulates time per stage for the create being measured (one at a time)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self._open: set[str] = set()  # a stage inside itself (nested checks) counts once

    @contextlib.contextmanager
    def span(self, stage: str) -> Iterator[None]:
        if stage in self._open:
            yield
            return
        self._open.add(stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[stage] += time.perf_counter() - t0
            self._open.discard(stage)

    def sync(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*a: Any, **kw: Any) -> Any:
            with self.span(stage):
                return fn(*a, **kw)

        return wrapped

    def coro(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapped(*a: Any, **kw: Any) -> Any:
            with self.span(stage):
                return await fn(*a, **kw)

        return wrapped

    def agen(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapped(*a: Any, **kw: Any) -> Any:
            with self.span(stage):
                async for x in fn(*a, **kw):
                    yield x

        return wrapped


@contextlib.contextmanager
def patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    # A class keeps its own descriptor (a classmethod), not the bound method getattr gives.
    old = obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def instrument(service: SandboxService, clock: Clock) -> Iterator[None]:
    core, sbx = service.core, service.sandboxes
    boot = MicroVM.boot  # a bound classmethod: wrap it as a plain function
    with contextlib.ExitStack() as st:
        for obj, attr in (
            (core.gate, "launch"),
            (core.gate, "uploads"),
            (core, "resolve_secrets"),
            (M, "check_shape"),
            (admission, "plan_from_create"),
            (sb_mod, "check_spec"),
        ):
            st.enter_context(patched(obj, attr, clock.sync("admission", getattr(obj, attr))))
        st.enter_context(patched(sb_mod, "policy_for", clock.coro("admission", sb_mod.policy_for)))
        st.enter_context(
            patched(core.store, "ensure", clock.sync("image lookup", core.store.ensure))
        )
        st.enter_context(patched(sbx, "insert", clock.coro("state writes", sbx.insert)))
        st.enter_context(patched(sbx, "serve", clock.sync("state writes", sbx.serve)))
        st.enter_context(patched(core, "start_egress", clock.coro("egress", core.start_egress)))
        st.enter_context(
            patched(MicroVM, "boot", staticmethod(clock.coro("VM restore (MicroVM.boot)", boot)))
        )
        st.enter_context(
            patched(
                sb_mod, "audit_after", clock.sync("audit: sandbox.launched", sb_mod.audit_after)
            )
        )
        st.enter_context(
            patched(AgentClient, "exec_stream", clock.agen(AGENT, AgentClient.exec_stream))
        )
        for attr in ("audit_before", "audit_after"):
            fn = getattr(execs_mod, attr)
            st.enter_context(
                patched(execs_mod, attr, clock.sync("audit: exec started+finished", fn))
            )
        yield


async def one_staged(service: SandboxService, n: int) -> dict[str, float]:
    clock = Clock()
    try:
        with instrument(service, clock):
            t0 = time.perf_counter()
            live = await service.sandboxes.create(
                M.CreateSandbox(image="python", name=f"st{n}", ttl_seconds=600)
            )
            t_create = time.perf_counter() - t0
            t1 = time.perf_counter()
            r = await service.execs.run(live.name, M.ExecRequest(argv=["true"], timeout=60))
            t2 = time.perf_counter()
    finally:  # the service's close() only detaches: a sandbox left up would keep its QEMU
        with contextlib.suppress(MvmError):
            await service.sandboxes.down(f"st{n}", reason="bench")
    assert r.exit_code == 0, r
    out = dict(clock.t)
    out["exec through the service"] = t2 - t1
    out["create"] = t_create
    out["total"] = t2 - t0  # create + first exec answered; the down is not timed
    named = sum(v for k, v in clock.t.items() if k not in (AGENT, "audit: exec started+finished"))
    out["create: rest (locks, records, wiring)"] = t_create - named
    out["own"] = out["total"] - clock.t["VM restore (MicroVM.boot)"] - clock.t[AGENT]
    return out


async def floor_once(store: ImageStore) -> tuple[float, float]:
    """Template restore + ``true`` in-process, no service (the issue's floor): the
    restore's and the first exec's seconds."""
    spec = VMSpec(store.ensure("python"))
    t0 = time.perf_counter()
    vm = await MicroVM.boot(spec, store=store, vm_id=new_id())
    try:
        t1 = time.perf_counter()
        r = await vm.require_agent().exec(["true"], timeout=60)
        t2 = time.perf_counter()
        assert r.exit_code == 0
    finally:
        await vm.destroy()
    return t1 - t0, t2 - t1


async def measure(
    rounds: int, also: Callable[[int], Awaitable[float]] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Median per stage over ``rounds`` creates, and the median floor; interleaved round
    by round with ``also`` (e.g. an SDK create through mvmd), whose seconds come back as
    ``also`` and its difference to the in-process service's total, per round, as
    ``beyond``."""
    store = ImageStore()
    with tempfile.TemporaryDirectory(prefix="mvcs-", dir=paths.run_dir()) as tmp:
        db = StateDB(Path(tmp) / "state.db")
        service = SandboxService(db, store)
        try:
            await floor_once(store)  # the template and page cache are hot before timing
            samples: list[dict[str, float]] = []
            floors: list[tuple[float, float]] = []
            for n in range(rounds):
                if also is not None:
                    t_also = await also(n)
                samples.append(await one_staged(service, n))
                floors.append(await floor_once(store))
                if also is not None:
                    samples[-1]["also"] = t_also
                    samples[-1]["beyond"] = t_also - samples[-1]["total"]
        finally:
            await service.close()
            db.close()
    keys = {k for s in samples for k in s}
    med = {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}
    floor = {
        "restore": statistics.median(f[0] for f in floors),
        "exec": statistics.median(f[1] for f in floors),
        "total": statistics.median(sum(f) for f in floors),
    }
    return med, floor


def rows(med: dict[str, float], fl: dict[str, float]) -> list[tuple[str, str, str]]:
    """(what, seconds, / floor) rows: the floor, the service's total, each stage, and
    mvmd's own share (all but the VM restore and the agent's exec round trip)."""
    floor = fl["total"]
    own = med["own"]  # per create, then the median (medians of parts do not add up)
    out = [
        ("in-process restore + exec `true` (floor)", f"{floor:.3f}", "1.00x"),
        (
            "  of which restore (MicroVM.boot)",
            f"{fl['restore']:.3f}",
            f"{fl['restore'] / floor:.2f}x",
        ),
        ("  of which first exec `true`", f"{fl['exec']:.3f}", f"{fl['exec'] / floor:.2f}x"),
        (
            "service create + first exec, in-process",
            f"{med['total']:.3f}",
            f"{med['total'] / floor:.2f}x",
        ),
    ]
    for k in (*STAGES, AGENT, "create: rest (locks, records, wiring)"):
        if k in med:
            out.append((f"  {k}", f"{med[k]:.4f}", f"{med[k] / floor:.2f}x"))
    what = "  mvmd's own share (all but VM restore and agent round trip)"
    out.append((what, f"{own:.4f}", f"{own / floor:.2f}x"))
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    med, floor = asyncio.run(measure(args.rounds))
    t = Table(title=f"service create -> first exec, by stage (median of {args.rounds})")
    for c in ("what", "seconds", "/ floor"):
        t.add_column(c, justify="left" if c == "what" else "right")
    for r in rows(med, floor):
        t.add_row(*r)
    Console().print(t)


if __name__ == "__main__":
    main()
