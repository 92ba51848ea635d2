"""Per-command cgroups (v2) in the guest: a fork bomb ends with its exec, the agent stays.

Standard library only (it runs in the guest beside ``agent.py``). The layout::

    /sys/fs/cgroup/            PID 1 (the reaper) stays here
      mvm-agent/               the serving agent: memory.min reserve, cpu.weight 10000
      mvm-work/                every command: pids.max and memory.max leave the agent room
        exec-N/, proc-N/       one per exec / background process: pids.max, memory.max,
                               memory.oom.group; killed whole with cgroup.kill

A command starts behind a gate (``/bin/sh`` waiting on a pipe, see ``agent.spawn``); the
agent moves it into its group (``Group.add``, as root) and only then opens the gate and
lets it exec the command, so nothing it forks can escape. (A Python ``preexec_fn`` would
do the same in the child, but makes every spawn a slow full fork of the agent.) Anything that fails
here leaves ``Cgroups.ok`` False with a reason, and the agent falls back to killing the
command's process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Any

ROOT = "/sys/fs/cgroup"
AGENT_GROUP = "mvm-agent"
WORK_GROUP = "mvm-work"
#: Default pids.max of one command's group (processes and threads).
DEFAULT_PIDS_MAX = 1024
#: Default memory.max of one command's group, as a percentage of the commands' budget.
DEFAULT_MEMORY_PCT = 100
#: Memory kept for the agent (its memory.min) and withheld from the commands' budget.
AGENT_MEMORY_RESERVE = 48 * 1024 * 1024
#: Tasks withheld from the commands' budget (pids.max of mvm-work) for the agent's threads.
AGENT_PIDS_RESERVE = 512
#: CPU weights: the agent wins whenever it wants the CPU (cpu.weight range 1..10000).
AGENT_CPU_WEIGHT = 10000
WORK_CPU_WEIGHT = 100
#: Bound on waiting for a killed group to empty before an exec answers (after that the
#: kernel finishes the kill on its own and the group is removed later).
KILL_WAIT = 3.0
#: Largest pids.max a sandbox may ask for per command.
MAX_PIDS_MAX = 1 << 22
#: Groups kept for later removal (detached commands, background processes).
MAX_STALE = 4096


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def mem_total(meminfo: str = "/proc/meminfo") -> int:
    for line in _read(meminfo).splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def check_limits(value: Any) -> dict[str, int]:
    """Validate the ``limits`` object of a hello: ``{"pids_max": 1.., "memory_pct": 1..100}``.

    Raises ValueError naming the bad field."""
    if not isinstance(value, dict):
        raise ValueError("'limits' must be an object")
    out: dict[str, int] = {}
    for key, lo, hi in (("pids_max", 1, MAX_PIDS_MAX), ("memory_pct", 1, 100)):
        if key not in value:
            continue
        v = value[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"'limits.{key}' must be an integer in [{lo}, {hi}]")
        out[key] = v
    unknown = set(value) - {"pids_max", "memory_pct"}
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}")
    return out


class Group:
    """One command's cgroup (or, when cgroups are unavailable, its process group)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.pgid: int | None = None

    def add(self, pid: int) -> None:
        """Move ``pid`` (the gated command, its own session leader) into the group."""
        self.pgid = pid
        if self.path is not None:
            _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        if self.path is None:
            return []
        try:
            return [int(x) for x in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except (OSError, ValueError):
            return []

    def populated(self) -> bool:
        if self.path is None:
            return False
        try:
            events = _read(os.path.join(self.path, "cgroup.events"))
        except OSError:
            return False
        return "populated 1" in events

    def kill(self) -> None:
        """SIGKILL everything in the group, forks racing the kill included (cgroup.kill);
        without cgroups, the command's process group."""
        if self.path is not None:
            try:
                _write(os.path.join(self.path, "cgroup.kill"), "1")
                return
            except OSError:  # a kernel before 5.14: kill what is listed, repeatedly
                for _ in range(100):
                    pids = self.pids()
                    if not pids:
                        return
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                return
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except OSError:
                pass

    def wait_empty(self, timeout: float = KILL_WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while self.populated():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True


class Cgroups:
    """The agent's cgroup tree. ``ok`` is False (with ``reason``) until ``setup`` worked."""

    def __init__(self, root: str = ROOT) -> None:
        self.root = root
        self.ok = False
        self.reason = "not set up"
        self.pids_max = DEFAULT_PIDS_MAX
        self.memory_pct = DEFAULT_MEMORY_PCT
        self.budget = 0  # bytes of memory the commands may use together
        self.work_pids = 0
        self.lock = threading.Lock()
        self.counter = 0
        self.stale: list[str] = []

    @property
    def work(self) -> str:
        return os.path.join(self.root, WORK_GROUP)

    def setup(self, pid: int) -> None:
        """Mount cgroup2 if needed, make the tree, move ``pid`` (the agent) into its group."""
        try:
            self._setup(pid)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.ok = False
            self.reason = f"{exc.__class__.__name__}: {exc}"
            return
        self.ok = True
        self.reason = ""

    def _setup(self, pid: int) -> None:
        if not os.path.exists(os.path.join(self.root, "cgroup.controllers")):
            os.makedirs(self.root, exist_ok=True)
            subprocess.run(
                ["mount", "-t", "cgroup2", "cgroup2", self.root],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
            if not os.path.exists(os.path.join(self.root, "cgroup.controllers")):
                raise OSError(f"cannot mount cgroup2 at {self.root}")
        available = _read(os.path.join(self.root, "cgroup.controllers")).split()
        missing = {"memory", "pids"} - set(available)
        if missing:
            raise OSError(f"cgroup controllers missing: {sorted(missing)}")
        agent = os.path.join(self.root, AGENT_GROUP)
        for d in (agent, self.work):
            os.makedirs(d, exist_ok=True)
        _write(os.path.join(agent, "cgroup.procs"), str(pid))
        wanted = [c for c in ("cpu", "memory", "pids") if c in available]
        _write(os.path.join(self.root, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
        _write(os.path.join(self.work, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
        total = mem_total()
        reserve = min(AGENT_MEMORY_RESERVE, total // 4)
        self.budget = total - reserve
        _write(os.path.join(agent, "memory.min"), str(reserve))
        _write(os.path.join(self.work, "memory.max"), str(self.budget))
        threads_max = int(_read("/proc/sys/kernel/threads-max").strip())
        self.work_pids = max(64, threads_max - AGENT_PIDS_RESERVE)
        _write(os.path.join(self.work, "pids.max"), str(self.work_pids))
        if "cpu" in wanted:
            _write(os.path.join(agent, "cpu.weight"), str(AGENT_CPU_WEIGHT))
            _write(os.path.join(self.work, "cpu.weight"), str(WORK_CPU_WEIGHT))

    def configure(self, limits: dict[str, int]) -> None:
        """Per-sandbox limits (from the host's hello), for commands started from now on."""
        with self.lock:
            self.pids_max = limits.get("pids_max", self.pids_max)
            self.memory_pct = limits.get("memory_pct", self.memory_pct)

    def describe(self) -> str:
        if not self.ok:
            return f"unavailable ({self.reason}): process-group kill only"
        return f"v2 pids.max={self.pids_max} memory.max={self.memory_pct}% of {self.budget}"

    def group(self, kind: str) -> Group:
        """A fresh group for one command; a process-group-only Group without cgroups."""
        if not self.ok:
            return Group(None)
        self.collect()
        with self.lock:
            self.counter += 1
            path = os.path.join(self.work, f"{kind}-{self.counter}")
            pids_max, memory = self.pids_max, self.budget * self.memory_pct // 100
        try:
            os.mkdir(path)
            _write(os.path.join(path, "pids.max"), str(pids_max))
            _write(os.path.join(path, "memory.max"), str(memory))
            _write(os.path.join(path, "memory.oom.group"), "1")
            return Group(path)
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass
            raise

    def release(self, group: Group, *, kill: bool) -> None:
        """The command ended: kill what is left (unless detached) and remove the group
        once empty (later, if something still runs in it)."""
        if kill:
            group.kill()
            group.wait_empty()
        if group.path is None:
            return
        try:
            os.rmdir(group.path)
        except OSError:
            with self.lock:
                if len(self.stale) < MAX_STALE:
                    self.stale.append(group.path)

    def collect(self) -> None:
        """Remove groups whose last process has gone (detached commands, proc.start)."""
        with self.lock:
            stale, self.stale = self.stale, []
        keep = []
        for path in stale:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                keep.append(path)
        with self.lock:
            self.stale.extend(keep)
