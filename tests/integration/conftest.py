"""Integration tests: real QEMU microVMs booted from the default image.

Every test under tests/integration is marked ``vm`` (select with ``-m vm``, skip with
``-m "not vm"``); each module sets a pytest timeout, and every wait inside is bounded. The
tests are skipped, with a clear reason, only when QEMU is not installed, and under CI=true
even that skip fails the run (tests/conftest.py); anything else that goes wrong is a failure.

VMs are expensive under TCG, so most agent-level tests share one session VM. The agent
client is asyncio: the shared VM lives on an event loop running in a background thread,
and tests drive it through ``call(coro)``, which waits a bounded time for the result.
Tests that break or kill a VM boot their own through ``boot_vm``.

All VMs (and the CLI's) get their run directories under a short private directory
(``MVM_RUN_DIR``) so socket paths stay short and leftovers (run dirs, QEMU processes)
can be detected precisely.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mvm.agent.client import AgentClient
from mvm.images.store import Image, ImageStore
from mvm.vm import MicroVM, VMSpec
from mvm.vmm.qemu import qemu_binary

T = TypeVar("T")

INTEGRATION_DIR = Path(__file__).resolve().parent
#: Default bound for one ``call(...)``.
CALL_TIMEOUT = 60.0
#: Bound for booting one VM (template creation included).
BOOT_WAIT = 180.0


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``vm`` (timeouts: pyproject's default, or the
    module's own ``pytest.mark.timeout``)."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.vm)


# ----------------------------------------------------------------------------- helpers


def qemu_pids(marker: str | Path) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions ``marker`` (a run dir)."""
    needle = str(marker).encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        argv0 = cmd.split(b"\0", 1)[0]
        if b"qemu" in os.path.basename(argv0) and needle in cmd:
            pids.append(int(p.name))
    return pids


def wait_no_qemu(marker: str | Path, timeout: float = 60.0) -> list[int]:
    """Wait (bounded) until no QEMU mentions ``marker``; return those still alive."""
    deadline = time.monotonic() + timeout
    while (pids := qemu_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def sandbox_dirs(run_dir: Path) -> list[str]:
    """Per-VM directories (``sb-*``) left under a run directory."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("sb-"))


class LoopThread:
    """An asyncio event loop in a daemon thread; ``call`` runs a coroutine on it, bounded."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="mvm-it-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the coroutine did not finish within {timeout:g}s") from None

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()


Call = Callable[..., Any]


# ----------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def _run_dir_env(root: Path) -> Iterator[None]:
    old = os.environ.get("MVM_RUN_DIR")
    os.environ["MVM_RUN_DIR"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MVM_RUN_DIR", None)
        else:
            os.environ["MVM_RUN_DIR"] = old


@pytest.fixture(scope="session")
def run_root() -> Iterator[Path]:
    """A short private run directory for the VMs of these tests, checked for leftovers at
    the end. MVM_RUN_DIR points at it only while they boot VMs (``run_dir_env``,
    ``start_vm``), so other tests in the session are not affected."""
    root = Path(tempfile.mkdtemp(prefix="mvm-it-", dir="/tmp"))
    try:
        yield root
    finally:
        leaked = wait_no_qemu(root, timeout=60)
        for pid in leaked:  # started by this session (their sockets are in our dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        assert not leaked, f"QEMU processes left running by the tests: {leaked}"


@pytest.fixture
def run_dir_env(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MVM_RUN_DIR set to the session's run directory for one test."""
    monkeypatch.setenv("MVM_RUN_DIR", str(run_root))
    return run_root


@pytest.fixture(scope="session")
def image(run_root: Path) -> Image:
    """The default image (built on first use). Skips only when QEMU is missing."""
    if shutil.which(qemu_binary()) is None:
        pytest.skip(
            f"{qemu_binary()} not found: install qemu-system-x86 to run the VM integration tests"
        )
    return ImageStore().ensure("python")


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def call(loop_thread: LoopThread) -> Call:
    """``call(coro, timeout=60)``: run a coroutine on the VM loop and return its result."""
    return loop_thread.call


@pytest.fixture(scope="session")
def start_vm(image: Image, loop_thread: LoopThread, run_root: Path) -> Callable[..., MicroVM]:
    """``start_vm(fast=None, **VMSpec fields)``: boot a VM of the default image on the
    VM loop (bounded), its run directory under ``run_root``. The caller destroys it."""

    def start(*, fast: bool | None = None, **spec: Any) -> MicroVM:
        with _run_dir_env(run_root):
            vm: MicroVM = loop_thread.call(
                MicroVM.boot(VMSpec(image, **spec), fast=fast), timeout=BOOT_WAIT
            )
        assert vm.run_dir.parent == run_root
        return vm

    return start


@pytest.fixture(scope="session")
def shared_vm(start_vm: Callable[..., MicroVM], loop_thread: LoopThread) -> Iterator[MicroVM]:
    """One VM for every test that only runs commands and touches files."""
    vm = start_vm()
    try:
        yield vm
    finally:
        loop_thread.call(vm.destroy(), timeout=30)
    assert not vm.qemu.alive()
    assert not vm.run_dir.exists()


@pytest.fixture
def agent(shared_vm: MicroVM) -> AgentClient:
    a = shared_vm.agent
    assert a is not None
    assert a.failure is None, f"an earlier test broke the shared VM: {a.failure!r}"
    return a


@pytest.fixture
def boot_vm(
    start_vm: Callable[..., MicroVM], loop_thread: LoopThread
) -> Iterator[Callable[..., MicroVM]]:
    """Factory for dedicated VMs (``boot_vm(cpus=..., fast=...)``); destroyed after the test."""
    vms: list[MicroVM] = []

    def boot(*, fast: bool | None = None, **spec: Any) -> MicroVM:
        vm = start_vm(fast=fast, **spec)
        vms.append(vm)
        return vm

    yield boot
    for vm in vms:
        loop_thread.call(vm.destroy(), timeout=30)
        assert not vm.qemu.alive()
        assert not vm.run_dir.exists()


@pytest.fixture
def gdir(agent: AgentClient, call: Call, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh directory in the shared guest (owned by the unprivileged user)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    path = f"/work/it-{name}-{os.urandom(3).hex()}"
    call(agent.mkdir(path))
    yield path
    if agent.failure is None:
        call(agent.remove(path, recursive=True))


# ----------------------------------------------------------------------------- CLI

_SCRIPT = Path(sys.executable).parent / "mvmctl"
MVMCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mvm.cli.main"]


@pytest.fixture
def mvmctl(image: Image, run_root: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``mvmctl ARGS`` in a subprocess (bounded); after each ``run``, check that the
    sandbox left nothing behind: no run directory and no QEMU process."""
    run_dir = run_root / f"cli-{os.urandom(3).hex()}"

    def run(
        *args: str, input: str | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MVM_RUN_DIR": str(run_dir)}
        proc = subprocess.run(
            [*MVMCTL, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if args and args[0] == "run":
            assert wait_no_qemu(run_dir) == [], f"mvmctl {args} left QEMU running"
            assert sandbox_dirs(run_dir) == [], f"mvmctl {args} left a run directory"
        return proc

    return run


@pytest.fixture(scope="session")
def assert_gone() -> Callable[[Path], None]:
    """``assert_gone(run_dir)``: no QEMU process uses the VM's run directory, and it is gone."""

    def check(run_dir: Path) -> None:
        assert wait_no_qemu(run_dir) == [], f"QEMU still running for {run_dir}"
        assert not run_dir.exists(), f"run directory left behind: {run_dir}"

    return check
