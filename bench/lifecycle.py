"""Named-sandbox lifecycle benchmark: mvmd (`up`, pause, snapshots, exec) vs in-process VMs.

Run: ``.venv/bin/python bench/lifecycle.py [--rounds N] [--execs N] [--json]``

Everything runs against a private, throw-away ``MVM_HOME`` (``/tmp/mvb-*``) whose
``images``, ``rootfs``, ``kernels``, ``initramfs`` and ``templates`` are symlinks to
the default store, so nothing is rebuilt; the daemon (auto-started by
``mvm.client.Client``), its sockets, state, logs and snapshots live there. The
start-up variants and the lifecycle operations are interleaved round by round (the
start-up order rotates), so host noise spreads over all of them. At the end, also on
Ctrl-C / SIGTERM: every sandbox is taken down, mvmd is stopped, any QEMU whose
command line mentions the temporary home is killed (by pid), and the home removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import (
    Row,
    add_sample_row,
    default_store,
    err,
    finish_facts,
    host_facts,
    host_table,
    json_report,
    private_home,
    raise_on_sigterm,
    ratios_table,
    report_console,
    samples_table,
    timer,
)
from mvm import client as mvmclient
from mvm import templates
from mvm.api import models as M
from mvm.errors import AgentError, MvmError
from mvm.images.store import ImageStore
from mvm.vm import MicroVM, VMSpec, base_config, template_key_for
from mvm.vmm.qemu import find_qemu

IMAGE = "python"
#: The default `up` shape: 1 vCPU, 512 MiB, writable layer half the memory (256 MiB).
#: In-process VMs use the same shape, so they and `up` restore the same boot template.
CPUS, MEMORY_MB, DISK_MB = 1, 512, 256
#: Seconds allowed for one in-process boot (a missing template is made first: a cold boot).
BOOT_WAIT = 180.0
#: Seconds allowed for one agent request / one `true` exec.
OP_TIMEOUT = 60.0
#: HTTP timeout of the mvmd client for small calls (create/snapshots have their own).
HTTP_TIMEOUT = 60.0

GROUPS = {
    "start": "start -> first exec `true` answered",
    "pause": "pause / resume (one running sandbox)",
    "snap": "snapshots (of a running sandbox)",
    "exec": "round trips on a running VM",
}


def make_rows() -> dict[str, Row]:
    spec: list[tuple[str, str, str, str]] = [
        ("daemon_start", "start", "mvmd auto-start (first Client call until it answers)", "s"),
        ("up", "start", "`up` (Client.create, template restore) -> running", "s"),
        ("up_boot", "start", "  of which VM boot inside mvmd (SandboxInfo.boot_seconds)", "s"),
        ("up_exec", "start", "`up` -> first exec answered (through mvmd)", "s"),
        ("cold", "start", "cold boot (MicroVM.boot fast=False) -> agent ready", "s"),
        ("cold_exec", "start", "cold boot -> first exec answered (in-process)", "s"),
        ("tpl", "start", "template restore (MicroVM.boot fast=True) -> agent ready", "s"),
        ("tpl_exec", "start", "template restore -> first exec answered (in-process)", "s"),
        ("snap_new", "start", "snapshot restore, sandbox was down (recreated) -> running", "s"),
        ("snap_new_exec", "start", "snapshot restore, recreated -> first exec (through mvmd)", "s"),
        ("down", "start", "`down` (Client.down) of a running sandbox", "s"),
        ("pause", "pause", "pause (Client.pause)", "ms"),
        ("resume", "pause", "resume (Client.resume, includes the clock re-handshake)", "ms"),
        ("resume_exec", "pause", "resume -> first exec answered", "ms"),
        ("snap_save", "snap", "snapshot save (Client.snapshot_save, running sandbox)", "s"),
        ("snap_size", "snap", "snapshot state file size", "MiB"),
        ("snap_disk", "snap", "snapshot state file allocated on disk", "MiB"),
        ("snap_restore", "snap", "snapshot restore in place -> running", "s"),
        ("snap_restore_exec", "snap", "snapshot restore in place -> first exec answered", "s"),
        ("status", "exec", "mvmd HTTP round trip (Client.status)", "ms"),
        ("exec_daemon", "exec", "exec `true` through mvmd (Client.exec_stream)", "ms"),
        ("exec_agent", "exec", "exec `true` in-process (AgentClient.exec)", "ms"),
        ("ping", "exec", "agent ping in-process (AgentClient.ping)", "ms"),
    ]
    return {k: Row(k, label, unit, group=g) for k, g, label, unit in spec}


# ------------------------------------------------------------------------ helpers


def template_inode(key: str) -> int | None:
    try:
        return (templates.TemplateStore().root / key / "state").stat().st_ino
    except OSError:
        return None


def shape_key(spec: VMSpec, store: ImageStore) -> str:
    """The boot-template key MicroVM.boot (in-process or inside mvmd) uses for ``spec``."""
    return template_key_for(spec, base_config(spec, store, Path("/nonexistent")))


def started_incoming(pid: int | None) -> bool:
    """Whether QEMU ``pid`` was started to load a saved state (a template or snapshot)."""
    if pid is None:
        return False
    try:
        return b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def daemon_exec(c: mvmclient.Client, name: str) -> None:
    """``true`` in sandbox ``name`` through mvmd, until its exit event."""
    code: int | None = None
    for ev in c.exec_stream(name, M.ExecRequest(argv=["true"], timeout=OP_TIMEOUT)):
        if ev.type == "exit":
            code = ev.exit_code
    if code != 0:
        raise RuntimeError(f"exec true in {name} ended with {code}")


async def agent_true(vm: MicroVM) -> None:
    r = await vm.require_agent().exec(["true"], timeout=OP_TIMEOUT)
    if r.exit_code != 0:
        raise RuntimeError(f"exec true exited {r.exit_code}: {r.stderr!r}")


Samples = dict[str, float]


class Bench:
    def __init__(self, args: argparse.Namespace, runner: asyncio.Runner, home: Path) -> None:
        self.args = args
        self.run = runner.run  # in-process VM work runs on this loop, one call at a time
        self.home = home
        self.rows = make_rows()
        self.failures: list[str] = []  # dropped samples and retried errors (reported)
        self.seq = 0
        self.store = ImageStore()
        self.img = self.store.ensure(IMAGE)
        self.spec = VMSpec(self.img, cpus=CPUS, memory_mb=MEMORY_MB, overlay_size=f"{DISK_MB}m")
        self.key = shape_key(self.spec, self.store)
        self.c = mvmclient.Client(timeout=HTTP_TIMEOUT)
        self.facts = host_facts(
            self.img,
            find_qemu(base_config(self.spec, self.store, home).qemu),
            shape=f"{CPUS} vCPU, {MEMORY_MB} MiB, writable layer {DISK_MB} MiB",
            store=str(args.default_home),
        )

    def add(self, samples: Samples) -> None:
        for key, value in samples.items():
            self.rows[key].samples.append(value)

    def drop(self, why: str) -> None:
        """A measurement that is not a sample (reported with the results)."""
        self.failures.append(f"{why}; not a sample")
        err.print(f"[yellow]{why}; not a sample[/]")

    def fresh_name(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}-{self.seq}"

    def attempt(self, what: str, fn: Callable[[], Samples], repair: Callable[[], None]) -> Samples:
        """``fn()``, retried once after an mvm error (then ``repair()`` runs first): one
        failure is reported with the results, not a crash; a second one is."""
        try:
            return fn()
        except MvmError as exc:
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")
            err.print(f"[yellow]{what} failed ({exc}); retrying once[/]")
        with contextlib.suppress(MvmError, OSError):
            repair()
        return fn()

    def create(self, name: str) -> M.SandboxInfo:
        return self.c.create(
            M.CreateSandbox(name=name, image=IMAGE, cpus=CPUS, memory_mb=MEMORY_MB)
        )

    def down_quietly(self, name: str) -> None:
        with contextlib.suppress(MvmError):
            self.c.down(name)

    # -- start-up variants -----------------------------------------------------------------
    def v_up(self) -> Samples:
        for attempt in range(2):
            name = self.fresh_name("up")
            before = template_inode(self.key)
            try:
                with timer() as t:
                    info = self.create(name)
                    t_up = t()
                    daemon_exec(self.c, name)
                    t_exec = t()
                restored = started_incoming(info.pid) and template_inode(self.key) == before
            except BaseException:
                self.down_quietly(name)
                raise
            with timer() as t:
                self.c.down(name)
                t_down = t()
            if restored:
                got = {"up": t_up, "up_exec": t_exec, "down": t_down}
                if info.boot_seconds is not None:
                    got["up_boot"] = info.boot_seconds
                return got
            self.drop(f"`up` did not restore a ready template (attempt {attempt + 1})")
        raise RuntimeError("`up` could not restore from a ready template twice in a row")

    async def _boot_exec(self, fast: bool) -> tuple[float, float, bool]:
        with timer() as t:
            vm = await MicroVM.boot(self.spec, store=self.store, fast=fast, boot_timeout=BOOT_WAIT)
            try:
                ready = t()
                await agent_true(vm)
                first = t()
            finally:
                await vm.destroy()
        return ready, first, vm.restored

    def v_cold(self) -> Samples:
        ready, first, _ = self.run(self._boot_exec(fast=False))
        return {"cold": ready, "cold_exec": first}

    def v_tpl(self) -> Samples:
        for attempt in range(2):
            before = template_inode(self.key)
            ready, first, restored = self.run(self._boot_exec(fast=True))
            if restored and before is not None and template_inode(self.key) == before:
                return {"tpl": ready, "tpl_exec": first}
            self.drop(f"in-process boot did not restore a ready template (attempt {attempt + 1})")
        raise RuntimeError("MicroVM.boot(fast=True) could not restore from a ready template")

    def v_snap_new(self) -> Samples:
        with timer() as t:
            self.c.snapshot_restore("snapsrc", "base")
            t_up = t()
            daemon_exec(self.c, "snapsrc")
            t_exec = t()
        data = self.c.read_file("snapsrc", "/work/marker")  # the writable layer came back
        if data != b"saved\n":
            raise RuntimeError(f"the restored sandbox has /work/marker = {data!r}")
        self.c.down("snapsrc")
        return {"snap_new": t_up, "snap_new_exec": t_exec}

    # -- lifecycle of one long-lived sandbox ------------------------------------------------
    def lifecycle(self, rnd: int) -> Samples:
        c, name, snap = self.c, "life", f"s{rnd}"
        with timer() as t:
            c.pause(name)
            t_pause = t()
        with timer() as t:
            c.resume(name)
            t_resume = t()
            daemon_exec(c, name)
            t_rexec = t()
        with timer() as t:
            s = c.snapshot_save(name, snap)
            t_save = t()
        got = {
            "pause": t_pause * 1000,
            "resume": t_resume * 1000,
            "resume_exec": t_rexec * 1000,
            "snap_save": t_save,
            "snap_size": s.size / 2**20,
        }
        with contextlib.suppress(OSError):
            state_file = self.home / "snapshots" / name / snap / "state"
            got["snap_disk"] = state_file.stat().st_blocks * 512 / 2**20
        c.write_file(name, "/work/after-save", b"x")  # must be gone after the restore
        with timer() as t:
            c.snapshot_restore(name, snap)
            got["snap_restore"] = t()
            daemon_exec(c, name)
            got["snap_restore_exec"] = t()
        try:
            c.stat(name, "/work/after-save")
        except AgentError:
            pass
        else:
            raise RuntimeError("a file written after the snapshot survived its restore")
        c.snapshot_remove(name, snap)
        return got

    def repair_life(self, rnd: int) -> None:
        with contextlib.suppress(MvmError):
            self.c.snapshot_remove("life", f"s{rnd}")
        self.down_quietly("life")
        self.create("life")

    # -- exec round trips ---------------------------------------------------------------------
    async def _agent_ops(self, vm: MicroVM) -> tuple[float, float]:
        agent = vm.require_agent()
        t0 = time.perf_counter()
        await agent_true(vm)
        t1 = time.perf_counter()
        await agent.ping(timeout=OP_TIMEOUT)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    def round_trips(self) -> None:
        vm = self.run(MicroVM.boot(self.spec, store=self.store, fast=True, boot_timeout=BOOT_WAIT))
        try:
            for _ in range(3):  # warm-up: the first requests after a restore page memory in
                self.run(self._agent_ops(vm))
                daemon_exec(self.c, "life")
                self.c.status()
            for _ in range(self.args.execs):  # alternate, so host noise hits all alike
                with timer() as t:
                    self.c.status()
                    t_status = t()
                with timer() as t:
                    daemon_exec(self.c, "life")
                    t_exec = t()
                ex, ping = self.run(self._agent_ops(vm))
                self.add(
                    {
                        "status": t_status * 1000,
                        "exec_daemon": t_exec * 1000,
                        "exec_agent": ex,
                        "ping": ping,
                    }
                )
        finally:
            self.run(vm.destroy())

    # -- the whole run ---------------------------------------------------------------------------
    def main(self) -> None:
        c = self.c
        with timer() as t:
            c.ensure_daemon()
            self.add({"daemon_start": t()})
        err.print(
            f"mvmd {c.status().pid} on {c.socket}; warm-up: template for the shape, "
            "sandboxes `life` and `snapsrc` (snapshot `base`)"
        )
        vm = self.run(MicroVM.boot(self.spec, store=self.store, fast=True, boot_timeout=BOOT_WAIT))
        self.run(vm.destroy())
        for name in ("life", "snapsrc"):
            self.create(name)
            daemon_exec(c, name)
        c.write_file("snapsrc", "/work/marker", b"saved\n")
        c.snapshot_save("snapsrc", "base")
        c.down("snapsrc")

        def nothing() -> None:
            pass

        variants: list[tuple[str, Callable[[], Samples], Callable[[], None]]] = [
            ("up", self.v_up, nothing),
            ("cold", self.v_cold, nothing),
            ("template", self.v_tpl, nothing),
            ("snapshot", self.v_snap_new, lambda: self.down_quietly("snapsrc")),
        ]
        for rnd in range(self.args.rounds):
            k = rnd % len(variants)  # rotate, so no variant always follows the same one
            notes = []
            for what, fn, repair in variants[k:] + variants[:k]:
                got = self.attempt(what, fn, repair)
                self.add(got)
                first = next(v for key, v in got.items() if key.endswith("_exec"))
                notes.append(f"{what} {first:.2f}s")
            got = self.attempt(
                "pause/snapshot",
                functools.partial(self.lifecycle, rnd),
                functools.partial(self.repair_life, rnd),
            )
            self.add(got)
            notes.append(f"pause {got['pause']:.0f}ms, save {got['snap_save']:.2f}s")
            err.print(f"round {rnd + 1}/{self.args.rounds}: " + ", ".join(notes))

        err.print(
            f"round trips: {self.args.execs}× status, exec via mvmd, exec and ping in-process"
        )
        self.round_trips()


# ------------------------------------------------------------------------ report


RATIOS: list[tuple[str, str, str, str]] = [
    # (name, numerator, denominator, how to read it)
    ("`up` vs cold boot (to first exec)", "cold_exec", "up_exec", "× faster"),
    ("`up` vs in-process template restore (to first exec)", "up_exec", "tpl_exec", "× the time"),
    (
        "template restore vs cold boot, in-process (to first exec)",
        "cold_exec",
        "tpl_exec",
        "× faster",
    ),
    (
        "snapshot restore (recreated) vs `up` (to first exec)",
        "snap_new_exec",
        "up_exec",
        "× the time",
    ),
    (
        "snapshot restore in place vs recreated (to first exec)",
        "snap_restore_exec",
        "snap_new_exec",
        "× the time",
    ),
    ("resume -> first exec vs `up` -> first exec", "up_exec", "resume_exec_s", "× faster"),
    ("exec `true`: through mvmd vs in-process", "exec_daemon", "exec_agent", "× the time"),
    ("exec `true` in-process vs ping", "exec_agent", "ping", "× the time"),
    ("exec through mvmd vs mvmd HTTP round trip", "exec_daemon", "status", "× the time"),
]


def compute_ratios(rows: dict[str, Row]) -> dict[str, Any]:
    # resume_exec is in ms; compare it with the start-ups (s) on the same scale.
    scaled = dict(rows)
    scaled["resume_exec_s"] = Row(
        "resume_exec_s", "", "s", [v / 1000 for v in rows["resume_exec"].samples], group="pause"
    )
    return common.compute_ratios(scaled, RATIOS)


def print_report(
    facts: dict[str, Any], rows: dict[str, Row], ratios: dict[str, Any], args: argparse.Namespace
) -> None:
    con = report_console()
    con.print(
        host_table(
            facts,
            ("accel", "cpus", "qemu", "python", "host_kernel", "image", "guest_kernel", "shape"),
        )
    )
    n = 0
    for group, title in GROUPS.items():
        extra = f" ({args.rounds} interleaved rounds)" if group != "exec" else ""
        t = samples_table(title + extra)
        for row in rows.values():
            if row.group != group:
                continue
            n += 1
            add_sample_row(t, str(n), row, ms_digits=1)
        con.print(t)
    con.print(ratios_table(ratios))
    for f in facts["notes"]:
        con.print(f"[yellow]note:[/] {f}")


# ------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds of every lifecycle row (default 3)"
    )
    ap.add_argument("--execs", type=int, default=20, help="round-trip samples (default 20)")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = ap.parse_args()
    if args.rounds < 1 or args.execs < 1:
        ap.error("--rounds and --execs must be at least 1")

    args.default_home = default_store()
    if ImageStore(args.default_home).find(IMAGE) is None:
        ap.error(f"no {IMAGE!r} image in {args.default_home}: run `mvmctl build` first")

    raise_on_sigterm()  # unwinds through every finally: cleanup() runs
    with private_home(args.default_home) as home:
        for var in ("MVM_RUN_DIR", "MVM_TEMPLATES"):  # run dirs under `home`; templates on
            if os.environ.pop(var, None) is not None:
                err.print(f"[yellow]note: ignoring {var} from the environment[/]")
        t0 = time.monotonic()
        with asyncio.Runner() as runner:
            bench = Bench(args, runner, home)
            try:
                bench.main()
            finally:
                bench.c.close()
    facts, rows = bench.facts, bench.rows
    facts["notes"] = bench.failures
    finish_facts(facts, t0)
    ratios = compute_ratios(rows)
    if args.json:
        print(json_report(facts, rows, ratios, rounds=args.rounds, execs=args.execs))
    else:
        print_report(facts, rows, ratios, args)


if __name__ == "__main__":
    main()
