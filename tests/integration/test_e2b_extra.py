"""E2B snapshots and forks through `mvmctl serve`, driven by the real `e2b` SDK: a
snapshot restored as a new sandbox has the state it was taken with, forks are copies of
the running source, and neither leaves the tenant."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

e2b = pytest.importorskip("e2b")
from e2b import Sandbox, SandboxException  # noqa: E402

from tests.integration.mvmd_home import wait_until  # noqa: E402
from tests.integration.test_serve import IMAGE, Served, served  # noqa: E402, F401

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def source(served: Served) -> Iterator[Sandbox]:  # noqa: F811
    s = Sandbox.create(IMAGE, timeout=1800, metadata={"suite": "snapshots"})
    try:
        yield s
    finally:
        s.kill()  # False when a test already removed it; an error is a real failure


def _kill(*boxes: object) -> None:
    for b in boxes:
        if isinstance(b, Sandbox):
            b.kill()  # False when already gone; an error is a real failure


def test_snapshot_restore_list_and_delete(served: Served, source: Sandbox) -> None:  # noqa: F811
    source.files.write("/tmp/state.txt", "before")
    source.commands.run(
        "echo $$ > /tmp/pid.tmp; mv /tmp/pid.tmp /tmp/pid; exec sleep 900", background=True
    )
    assert wait_until(lambda: source.files.exists("/tmp/pid"), 60)
    snap = source.create_snapshot(name="snap-one")
    assert snap.snapshot_id == f"{source.sandbox_id}:snap-one"
    assert snap.names == [snap.snapshot_id]
    source.files.write("/tmp/state.txt", "after")  # the source keeps running, changed
    listed = Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()
    assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
    assert snap.snapshot_id in {s.snapshot_id for s in Sandbox.list_snapshots().next_items()}
    # Another tenant sees none of it.
    theirs = Sandbox.list_snapshots(sandbox_id=source.sandbox_id, api_key=served.other)
    assert theirs.next_items() == []
    copy = Sandbox.create(snap.snapshot_id, timeout=600)
    try:
        assert copy.sandbox_id != source.sandbox_id
        assert copy.files.read("/tmp/state.txt") == "before"
        pid = copy.files.read("/tmp/pid").strip()
        assert copy.commands.run(f"cat /proc/{pid}/cmdline").stdout.startswith("sleep")
        assert source.files.read("/tmp/state.txt") == "after"
        assert copy.sandbox_id in {s.sandbox_id for s in Sandbox.list().next_items()}
    finally:
        _kill(copy)
    with pytest.raises(SandboxException):
        source.create_snapshot(mode="filesystem")  # mvm keeps memory: refused, not faked
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    assert Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items() == []


def test_fork_makes_independent_running_copies(served: Served, source: Sandbox) -> None:  # noqa: F811
    source.files.write("/tmp/fork.txt", "parent")
    kids = source.fork(count=2, timeout=600)
    try:
        assert all(isinstance(k, Sandbox) for k in kids), kids
        boxes = [k for k in kids if isinstance(k, Sandbox)]
        assert len({k.sandbox_id for k in boxes} | {source.sandbox_id}) == 3
        for k in boxes:
            assert k.files.read("/tmp/fork.txt") == "parent"
        boxes[0].files.write("/tmp/fork.txt", "child")
        assert boxes[1].files.read("/tmp/fork.txt") == "parent"
        assert source.files.read("/tmp/fork.txt") == "parent"
        info = Sandbox.get_info(boxes[0].sandbox_id)
        assert info.metadata == {"suite": "snapshots"}  # a fork keeps the source's metadata
        assert source.commands.run("echo alive").stdout == "alive\n"
    finally:
        _kill(*kids)
    # mvmd recorded the fork in the tenant's chain, with its token as actor.
    chain = served.home / "audit" / "acme.jsonl"
    recs = [json.loads(x) for x in chain.read_text().splitlines()]
    forked = [r for r in recs if r["event"] == "sandbox.forked"]
    assert forked and all(r["actor"] == served.acme_id for r in forked)


def test_watch_dir_sync_and_async(served: Served, source: Sandbox) -> None:  # noqa: F811
    from e2b import AsyncSandbox, FilesystemEventType

    source.files.make_dir("/tmp/w/sub")
    source.files.write("/tmp/w/old.txt", "x")
    handle = source.files.watch_dir("/tmp/w", recursive=True)
    try:
        source.files.write("/tmp/w/new.txt", "hello")
        source.files.write("/tmp/w/old.txt", "longer now")
        source.files.write("/tmp/w/sub/deep.txt", "d")
        source.files.remove("/tmp/w/new.txt")
        source.files.write("/tmp/w/kept.txt", "k")
        got = {(e.name, e.type) for e in handle.get_new_events()}
        assert got == {
            ("old.txt", FilesystemEventType.WRITE),
            ("sub/deep.txt", FilesystemEventType.CREATE),
            ("kept.txt", FilesystemEventType.CREATE),
        }  # new.txt came and went between two looks: a poll does not see it
        assert handle.get_new_events() == []
    finally:
        handle.stop()

    async def watch_async() -> set[tuple[str, object]]:
        a = await AsyncSandbox.connect(source.sandbox_id)
        seen: set[tuple[str, object]] = set()
        done = asyncio.Event()

        created = asyncio.Event()

        def on_event(e: object) -> None:
            seen.add((e.name, e.type))  # type: ignore[attr-defined]
            if ("late.txt", FilesystemEventType.CREATE) in seen:
                created.set()
            if ("late.txt", FilesystemEventType.REMOVE) in seen:
                done.set()

        h = await a.files.watch_dir("/tmp/w", on_event, recursive=False)
        try:
            await a.files.write("/tmp/w/late.txt", "1")
            await asyncio.wait_for(created.wait(), 60)  # bounded: the create event came
            await a.files.remove("/tmp/w/late.txt")
            await asyncio.wait_for(done.wait(), 60)
        finally:
            await h.stop()
        return seen

    seen = asyncio.run(asyncio.wait_for(watch_async(), 120))
    assert seen == {
        ("late.txt", FilesystemEventType.CREATE),
        ("late.txt", FilesystemEventType.REMOVE),
    }
