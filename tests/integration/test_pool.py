"""The pool of waiting VMs on real VMs through a private mvmd: after the first create of a
shape mvmd keeps MVM_POOL_SIZE QEMUs waiting for it, hands each out once (to distinct
sandboxes that answer exec), refills, and kills the waiting ones on ``daemon stop``
(sandboxes keep running). QEMU processes are counted from /proc.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mvmd_home import Ctl, private_home, qemu_pids, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(500)]

SIZE = 2


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with private_home("mvmp-") as h:
        yield h


@pytest.fixture(scope="module")
def ctl(home: Path) -> Ctl:
    c = Ctl(home)
    c.env["MVM_POOL_SIZE"] = str(SIZE)  # mvmd, started by the first call, inherits it
    c.env["MVM_POOL_WARM"] = "0"  # the unwarmed path (the pre-warmed one has its own test)
    return c


def status(ctl: Ctl) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ctl.ok("daemon", "status", "--json", timeout=30).out)
    return out


def test_pool_hands_out_distinct_vms_refills_and_drains(ctl: Ctl, home: Path) -> None:
    ctl.ok("up", "--name", "p0", "--ttl", "10m", timeout=300)  # makes the shape hot

    def sandbox_pids() -> set[int]:
        return {s["pid"] for s in ctl.sandboxes().values()}

    def waiting() -> set[int]:
        return set(qemu_pids(home)) - sandbox_pids()

    assert wait_until(lambda: len(waiting()) == SIZE, 180, interval=1.0), waiting()
    pool = status(ctl)["pool"]
    assert (pool["idle"], pool["size"], pool["handed_out"]) == (SIZE, SIZE, 0)
    ready = waiting()

    ctl.ok("up", "--name", "p1", "--ttl", "10m", timeout=300)
    ctl.ok("up", "--name", "p2", "--ttl", "10m", timeout=300)
    listed = ctl.sandboxes()
    p1, p2 = listed["p1"]["pid"], listed["p2"]["pid"]
    assert p1 != p2 and {p1, p2} <= ready  # both came from the pool, each once
    assert listed["p1"]["id"] != listed["p2"]["id"]
    for n in ("p1", "p2"):
        assert ctl.ok("exec", n, "--", "sh", "-c", "echo hi-$0", n).out.strip() == f"hi-{n}"
    ctl.ok("exec", "p1", "--", "sh", "-c", "echo mine > /tmp/x")
    assert ctl("exec", "p2", "--", "test", "-e", "/tmp/x").rc == 1

    assert wait_until(lambda: len(waiting()) == SIZE, 180, interval=1.0), waiting()
    assert not (waiting() & ready)  # refilled with new QEMUs
    assert status(ctl)["pool"]["handed_out"] == 2

    running = sandbox_pids()
    ctl.ok("daemon", "stop", timeout=60)
    assert wait_until(lambda: set(qemu_pids(home)) == running, 30), (qemu_pids(home), running)


@pytest.fixture(scope="module")
def warm_home() -> Iterator[Path]:
    with private_home("mvmw-") as h:
        yield h


def test_prewarmed_pool_hands_out_running_vms_with_their_own_identity(warm_home: Path) -> None:
    """MVM_POOL_WARM=1: waiting VMs are restored and have run one exec already; each
    hand-out still gets the create's own handshake (its RNG reseeded: two hand-outs of the
    same template read different random bytes) and is its own sandbox."""
    ctl = Ctl(warm_home)
    ctl.env["MVM_POOL_SIZE"] = str(SIZE)
    ctl.env["MVM_POOL_WARM"] = "1"
    ctl.ok("up", "--name", "w0", "--ttl", "10m", timeout=300)

    def waiting() -> set[int]:
        return set(qemu_pids(warm_home)) - {s["pid"] for s in ctl.sandboxes().values()}

    assert wait_until(lambda: len(waiting()) == SIZE, 240, interval=1.0), waiting()
    assert status(ctl)["pool"]["warm"] == 1
    ready = waiting()
    ctl.ok("up", "--name", "w1", "--ttl", "10m", timeout=300)
    ctl.ok("up", "--name", "w2", "--ttl", "10m", timeout=300)
    listed = ctl.sandboxes()
    assert {listed["w1"]["pid"], listed["w2"]["pid"]} <= ready
    rand = {
        n: ctl.ok("exec", n, "--", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1").out
        for n in ("w1", "w2")
    }
    assert rand["w1"] != rand["w2"]
    ctl.ok("exec", "w1", "--", "sh", "-c", "echo mine > /tmp/x")
    assert ctl("exec", "w2", "--", "test", "-e", "/tmp/x").rc == 1
    ctl.ok("down", "--all", timeout=120)
    ctl.ok("daemon", "stop", timeout=60)
    assert wait_until(lambda: not qemu_pids(warm_home), 60), qemu_pids(warm_home)


@pytest.fixture(scope="module")
def burst_home() -> Iterator[Path]:
    with private_home("mvmb-") as h:
        yield h


def test_concurrent_burst_hands_each_waiting_vm_out_once(burst_home: Path) -> None:
    """More creates at once than VMs wait: each waiting VM goes to exactly one of them,
    the rest boot, all are distinct sandboxes that answer exec, and the pool refills with
    new QEMUs once the burst is handed out."""
    ctl = Ctl(burst_home)
    ctl.env["MVM_POOL_SIZE"] = str(SIZE)
    ctl.ok("up", "--name", "b0", "--ttl", "10m", timeout=300)

    def sandbox_pids() -> set[int]:
        return {s["pid"] for s in ctl.sandboxes().values()}

    def waiting() -> set[int]:
        return set(qemu_pids(burst_home)) - sandbox_pids()

    assert wait_until(lambda: len(waiting()) == SIZE, 240, interval=1.0), waiting()
    ready = waiting()
    names = [f"b{i}" for i in range(1, SIZE + 3)]
    procs = {n: ctl.popen("up", "--name", n, "--ttl", "10m") for n in names}
    for n, p in procs.items():
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, (n, out, err)
    listed = ctl.sandboxes()
    pids = [listed[n]["pid"] for n in names]
    assert len(set(pids)) == len(names)  # no VM serves two sandboxes
    assert len({listed[n]["id"] for n in names}) == len(names)
    assert len(set(pids) & ready) == SIZE  # every waiting VM handed out, each once
    assert status(ctl)["pool"]["handed_out"] == SIZE
    for n in names:
        assert ctl.ok("exec", n, "--", "sh", "-c", "echo hi-$0", n).out.strip() == f"hi-{n}"
    assert wait_until(lambda: len(waiting()) == SIZE, 240, interval=1.0), waiting()
    assert not (waiting() & ready)
    ctl.ok("down", "--all", timeout=120)
    ctl.ok("daemon", "stop", timeout=60)
    assert wait_until(lambda: not qemu_pids(burst_home), 60), qemu_pids(burst_home)
