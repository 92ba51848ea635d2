"""Start-up and agent benchmark: bare QEMU vs mvm cold boot vs template restore vs mvmctl.

Run: ``.venv/bin/python bench/start.py [--rounds N] [--json]``

The boot variants are interleaved round by round (in a rotating order), so noise
from other work on the host spreads over all of them instead of skewing one.
Every QEMU this script starts (directly, through MicroVM, or through mvmctl) keeps
its sockets under one temporary directory; whatever is left of them at the end is
killed by pid, and the directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Row,
    add_sample_row,
    compute_ratios,
    err,
    finish_facts,
    host_facts,
    host_table,
    json_report,
    kill_strays,
    raise_on_sigterm,
    ratios_table,
    report_console,
    samples_table,
)
from mvm import templates
from mvm.agent.client import AgentClient
from mvm.images.store import ImageStore
from mvm.vm import BOOT_TIMEOUT, MicroVM, VMSpec, base_config
from mvm.vmm.argv import build_argv
from mvm.vmm.qemu import find_qemu

REPO = Path(__file__).resolve().parent.parent
MVMCTL = REPO / ".venv" / "bin" / "mvmctl"
IMAGE = "python"
#: Seconds allowed for QEMU to create its agent socket.
SOCKET_WAIT = 10.0
#: Seconds allowed for one whole ``mvmctl run -- true``.
CLI_TIMEOUT = 180.0
#: Seconds allowed for one agent request in the ops phase.
OP_TIMEOUT = 60.0
BLOB_SIZE = 16 * 1024 * 1024


# ------------------------------------------------------------------------ boot variants


async def wait_socket(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> AgentClient:
    """Connect to QEMU's agent socket as soon as it accepts connections."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {proc.returncode} before its agent socket")
        if path.exists():
            try:
                return await AgentClient.connect(
                    path, timeout=max(0.1, deadline - time.monotonic())
                )
            except (ConnectionRefusedError, FileNotFoundError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU did not open {path} within {SOCKET_WAIT:g}s")
        await asyncio.sleep(0.002)


async def bare_boot(spec: VMSpec, store: ImageStore, root: Path, n: int) -> float:
    """QEMU started by hand from build_argv(base_config()), timed until hello() answers."""
    run_dir = root / f"bare{n}"
    run_dir.mkdir()
    cfg = base_config(spec, store, run_dir)
    argv = build_argv(cfg)
    argv[0] = find_qemu(argv[0])
    proc: subprocess.Popen[bytes] | None = None
    agent: AgentClient | None = None
    try:
        with (run_dir / "qemu.log").open("wb") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        p = proc
        agent = await wait_socket(cfg.agent_socket, p, time.monotonic() + SOCKET_WAIT)
        await agent.hello(BOOT_TIMEOUT, alive=lambda: p.poll() is None)
        elapsed = time.monotonic() - t0
    except BaseException as exc:
        try:
            tail = (run_dir / "qemu.log").read_text(errors="replace")[-1000:].strip()
        except OSError:
            tail = ""
        if tail and isinstance(exc, Exception):
            exc.add_note(f"qemu stderr: {tail}")
        raise
    finally:
        if agent is not None:
            await agent.close()
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)
    return elapsed


def template_dirs() -> set[tuple[str, int]]:
    """The committed templates (name, inode): a new entry means one was (re)made."""
    root = templates.TemplateStore().root
    try:
        return {(p.name, p.stat().st_ino) for p in root.iterdir() if not p.name.startswith(".")}
    except OSError:
        return set()


async def mvm_boot(spec: VMSpec, store: ImageStore, fast: bool) -> float:
    """MicroVM.boot() wall time (destroy not included).

    With ``fast``, a boot that did not restore, or that had to make the template first
    (it was missing or dropped, e.g. by another process sharing MVM_HOME), is not a
    sample: it is retried once, after which the template exists again.
    """
    for attempt in range(2):
        before = template_dirs() if fast else set()
        t0 = time.monotonic()
        vm = await MicroVM.boot(spec, store=store, fast=fast)
        elapsed = time.monotonic() - t0
        restored = vm.restored
        await vm.destroy()
        if not fast:
            return elapsed
        made = template_dirs() - before
        if restored and not made:
            return elapsed
        why = "did not restore" if not restored else "had to make a template first"
        err.print(f"[yellow]template boot {why} (attempt {attempt + 1}); not a sample[/]")
    raise RuntimeError("MicroVM.boot(fast=True) could not restore from a ready template")


async def cli_run(root: Path, templates_on: bool) -> float:
    """Wall time of a whole ``mvmctl run -- true`` process."""
    env = {**os.environ, "MVM_RUN_DIR": str(root / "cli")}
    if not templates_on:
        env["MVM_TEMPLATES"] = "0"
    else:
        env.pop("MVM_TEMPLATES", None)
    for attempt in range(2):
        before = template_dirs()
        elapsed = await cli_once(root, env)
        if not templates_on or not (template_dirs() - before):
            return elapsed
        err.print(f"[yellow]mvmctl had to make a template (attempt {attempt + 1}); not a sample[/]")
    raise RuntimeError("mvmctl run made a new template twice in a row")


async def cli_once(root: Path, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(MVMCTL),
        "run",
        "--",
        "true",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _out, errout = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 10)
        kill_strays(str(root / "cli"))  # its QEMU runs in a session of its own
        raise
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"mvmctl run -- true exited {proc.returncode}: {errout.decode(errors='replace')[-1000:]}"
        )
    return elapsed


# ------------------------------------------------------------------------ agent ops on one VM


async def agent_ops(
    spec: VMSpec,
    store: ImageStore,
    rows: dict[str, Row],
    pings: int,
    execs: int,
    io_reps: int,
) -> None:
    async with await MicroVM.boot(spec, store=store, fast=True) as vm:
        agent = vm.require_agent()
        for _ in range(3):  # warm-up: first requests after a restore page memory in
            await agent.ping(timeout=OP_TIMEOUT)
            await agent.exec(["true"], timeout=OP_TIMEOUT)
        # Alternate ping and exec so host noise hits both alike (the ratio stays fair).
        for i in range(max(pings, execs)):
            if i < pings:
                t0 = time.perf_counter()
                await agent.ping(timeout=OP_TIMEOUT)
                rows["ping"].samples.append((time.perf_counter() - t0) * 1000)
            if i < execs:
                t0 = time.perf_counter()
                r = await agent.exec(["true"], timeout=OP_TIMEOUT)
                rows["exec"].samples.append((time.perf_counter() - t0) * 1000)
                if r.exit_code != 0:
                    raise RuntimeError(f"exec true exited {r.exit_code}: {r.stderr!r}")
        blob = os.urandom(BLOB_SIZE)
        path = "/tmp/mvm-bench.bin"
        for _ in range(io_reps):
            t0 = time.perf_counter()
            size = await asyncio.wait_for(agent.write_file(path, blob), OP_TIMEOUT)
            tw = time.perf_counter() - t0
            if size != len(blob):
                raise RuntimeError(f"write_file reported {size} bytes, sent {len(blob)}")
            t0 = time.perf_counter()
            back = await asyncio.wait_for(agent.read_file(path), OP_TIMEOUT)
            tr = time.perf_counter() - t0
            if back != blob:
                raise RuntimeError(f"read_file returned different bytes ({len(back)} bytes)")
            await agent.remove(path)
            rows["write"].samples.append(len(blob) / tw / 1e6)
            rows["read"].samples.append(len(blob) / tr / 1e6)


# ------------------------------------------------------------------------ report


RATIOS: list[tuple[str, str, str, str]] = [
    # (name, numerator, denominator, how to read it)
    ("template restore vs bare cold boot", "bare", "restore", "× faster"),
    ("mvm cold boot vs bare cold boot", "cold", "bare", "× the time"),
    ("`mvmctl run -- true` (template) vs bare cold boot", "bare", "cli_fast", "× faster"),
    ("`mvmctl run -- true` (cold) vs bare cold boot", "cli_cold", "bare", "× the time"),
    ("`mvmctl run -- true`: template vs cold", "cli_cold", "cli_fast", "× faster"),
    ("`mvmctl run -- true` (template) vs in-process restore", "cli_fast", "restore", "× the time"),
    ("exec `true` vs ping", "exec", "ping", "× the time"),
]


def print_report(
    facts: dict[str, Any], rows: dict[str, Row], ratios: dict[str, Any], args: argparse.Namespace
) -> None:
    con = report_console()
    con.print(
        host_table(
            facts, ("accel", "cpus", "qemu", "python", "host_kernel", "image", "guest_kernel")
        )
    )
    t = samples_table(f"start-up ({args.rounds} interleaved rounds) and agent round trips")
    numbers = {
        "bare": "1",
        "cold": "2",
        "restore": "3",
        "cli_fast": "4",
        "cli_cold": "5",
        "ping": "6",
        "exec": "6",
        "write": "7",
        "read": "7",
    }
    for key, row in rows.items():
        add_sample_row(t, numbers[key], row, ms_digits=2)
    con.print(t)
    # pings and execs are not taken in pairs (50 vs 20 by default): no per-round range
    con.print(ratios_table(ratios, unpaired=("ping",)))


# ------------------------------------------------------------------------ main


async def bench(args: argparse.Namespace, root: Path) -> tuple[dict[str, Any], dict[str, Row]]:
    store = ImageStore()
    img = store.ensure(IMAGE)
    spec = VMSpec(img)  # the same shape (1 CPU, 512 MiB) as `mvmctl run` by default
    facts = host_facts(img, find_qemu(base_config(spec, store, root).qemu))
    rows = {
        "bare": Row("bare", "bare QEMU cold boot -> agent ready", "s"),
        "cold": Row("cold", "mvm cold boot (MicroVM.boot fast=False) -> agent ready", "s"),
        "restore": Row(
            "restore", "mvm template restore (MicroVM.boot fast=True) -> agent ready", "s"
        ),
        "cli_fast": Row(
            "cli_fast", "`mvmctl run -- true` (whole CLI process, template restore)", "s"
        ),
        "cli_cold": Row("cli_cold", "`mvmctl run -- true` with MVM_TEMPLATES=0 (cold)", "s"),
        "ping": Row("ping", "agent ping round trip", "ms"),
        "exec": Row("exec", "exec `true` round trip", "ms"),
        "write": Row("write", "write_file 16 MiB random blob", "MB/s"),
        "read": Row("read", "read_file 16 MiB random blob (byte-exact)", "MB/s"),
    }
    if not templates.enabled():
        err.print(
            "[yellow]note: MVM_TEMPLATES=0 in the environment; rows 3/4 force templates on[/]"
        )

    err.print("warm-up: template restore (makes the template if missing) and one mvmctl run")
    vm = await MicroVM.boot(spec, store=store, fast=True)
    await vm.destroy()
    await cli_run(root, templates_on=True)

    variants: list[tuple[str, Callable[[int], Awaitable[float]]]] = [
        ("bare", lambda n: bare_boot(spec, store, root, n)),
        ("cold", lambda n: mvm_boot(spec, store, fast=False)),
        ("restore", lambda n: mvm_boot(spec, store, fast=True)),
        ("cli_fast", lambda n: cli_run(root, templates_on=True)),
        ("cli_cold", lambda n: cli_run(root, templates_on=False)),
    ]
    for rnd in range(args.rounds):
        k = rnd % len(variants)  # rotate the order so no variant always follows the same one
        order = variants[k:] + variants[:k]
        line = []
        for key, fn in order:
            secs = await fn(rnd)
            rows[key].samples.append(secs)
            line.append(f"{key} {secs:.2f}s")
        err.print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(line))

    err.print(
        f"agent ops: {args.pings} pings, {args.execs} execs, {args.io_reps}× 16 MiB write+read"
    )
    await agent_ops(spec, store, rows, args.pings, args.execs, args.io_reps)
    return facts, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the boot rows (default 3)")
    ap.add_argument("--pings", type=int, default=50, help="ping samples (default 50)")
    ap.add_argument("--execs", type=int, default=20, help="exec `true` samples (default 20)")
    ap.add_argument("--io-reps", type=int, default=3, help="16 MiB write+read repetitions")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = ap.parse_args()
    if args.rounds < 1 or args.pings < 1 or args.execs < 1 or args.io_reps < 1:
        ap.error("--rounds, --pings, --execs and --io-reps must be at least 1")
    if not MVMCTL.is_file():
        ap.error(f"{MVMCTL} not found (create the venv: pip install -e .)")

    raise_on_sigterm()  # unwinds through every finally: QEMUs killed, temp dir removed
    root = Path(tempfile.mkdtemp(prefix="mvb-", dir="/tmp"))
    # MicroVM.boot puts run dirs under MVM_RUN_DIR: every QEMU we start then has `root` in its argv.
    os.environ["MVM_RUN_DIR"] = str(root / "vm")
    t0 = time.monotonic()
    try:
        facts, rows = asyncio.run(bench(args, root))
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    finally:
        strays = kill_strays(str(root))
        if strays:
            err.print(f"[yellow]killed {strays} leftover QEMU process(es)[/]")
        shutil.rmtree(root, ignore_errors=True)
    finish_facts(facts, t0)
    ratios = compute_ratios(rows, RATIOS)
    if args.json:
        print(json_report(facts, rows, ratios, rounds=args.rounds))
    else:
        print_report(facts, rows, ratios, args)


if __name__ == "__main__":
    main()
