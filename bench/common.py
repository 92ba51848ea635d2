"""Helpers shared by the benchmarks in bench/ (not a benchmark itself).

The scripts are run as ``python bench/X.py``; each puts this directory on ``sys.path``
(from its own ``__file__``) and imports this module as ``common``.

- ``Row``: one measurement's samples, its median and its JSON form.
- host facts (``qemu_version``, ``host_facts``, ``finish_facts``) for the report.
- cleanup of what a run started: ``qemu_pids`` / ``kill_strays`` (by a marker in QEMU's
  command line), and a private, throw-away ``MVM_HOME`` whose image store is symlinked
  to the default one (``default_store``, ``make_home``, ``cleanup``, ``private_home``).
- ``timer``, ``fmt``, ``ratio`` / ``compute_ratios``, ``json_report`` and the pieces of
  the rich report (``report_console``, ``host_table``, ``samples_table``, ``add_sample_row``,
  ``ratios_table``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mvm import client as mvmclient
from mvm import paths
from mvm.errors import MvmError
from mvm.images.store import Image
from mvm.vmm import accel

#: Store directories a private MVM_HOME shares with the default one (symlinked, never
#: written except that a missing boot template is made, as any mvm command would).
LINKED = ("images", "rootfs", "kernels", "initramfs", "templates")
#: Seconds allowed for mvmd to exit after Client.shutdown().
DAEMON_STOP_WAIT = 10.0

err = Console(stderr=True, soft_wrap=True)


@dataclass
class Row:
    key: str
    label: str
    unit: str  # "s", "ms", "MB/s" or "MiB"
    samples: list[float] = field(default_factory=list)
    group: str | None = None  # the report table it belongs in, if there are several

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.group is None else {"group": self.group}
        out.update(
            {
                "label": self.label,
                "unit": self.unit,
                "samples": self.samples,
                "median": self.median if self.samples else None,
                "min": min(self.samples) if self.samples else None,
                "max": max(self.samples) if self.samples else None,
            }
        )
        return out


# ------------------------------------------------------------------------ host facts


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def host_facts(img: Image, qemu: str, **extra: Any) -> dict[str, Any]:
    """Facts about the host for the report; ``extra`` entries are added at the end."""
    choice = accel.detect()
    return {
        "accel": choice.accel,
        "accel_reason": choice.reason,
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "qemu": qemu_version(qemu),
        "qemu_path": qemu,
        "python": platform.python_version(),
        "host_kernel": platform.release(),
        "image": f"{img.name} ({img.id[:12]})",
        "guest_kernel": img.kernel_release,
        **extra,
    }


def finish_facts(facts: dict[str, Any], t0: float) -> None:
    """Add the load average at the end and the wall time since ``t0`` (time.monotonic)."""
    facts["loadavg_end"] = list(os.getloadavg())
    facts["wall_seconds"] = time.monotonic() - t0


# ------------------------------------------------------------------------ cleanup


def raise_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so it unwinds through every ``finally``."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions ``marker`` (our temporary directory)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if "qemu" not in os.path.basename(argv[0].decode(errors="replace")):
            continue
        if any(marker.encode() in a for a in argv):
            found.append(int(d.name))
    return found


def kill_strays(marker: str) -> int:
    """SIGKILL the QEMU processes whose command line mentions ``marker``; how many."""
    killed = 0
    for pid in qemu_pids(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def default_store() -> Path:
    """The default store: paths.home() as it is without MVM_HOME (~/.local/share/mvm)."""
    saved = os.environ.pop("MVM_HOME", None)
    try:
        return paths.home()
    finally:
        if saved is not None:
            os.environ["MVM_HOME"] = saved


def make_home(default_home: Path, prefix: str = "mvb-") -> Path:
    """A new ``/tmp/<prefix>*`` directory whose LINKED entries link into ``default_home``."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    (default_home / "templates").mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        target = default_home / name
        if target.is_dir():
            (home / name).symlink_to(target)
    return home


def daemon_pid(home: Path) -> int | None:
    """The pid of the mvmd serving ``home`` (from its lock file), if that process is it."""
    try:
        pid = int((home / "mvmd.lock").read_text().strip())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if f"MVM_HOME={home}".encode() in environ and b"mvm.daemon" in cmdline:
        return pid
    return None


def exited(pid: int) -> bool:
    """Whether ``pid`` is gone. mvmd, auto-started by our Client, is our child: once it
    exits it stays a zombie until reaped, so reap it here."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cleanup(home: Path) -> None:
    """Down every sandbox, stop mvmd, kill leftover QEMUs, remove the home. Best effort,
    every step bounded."""
    pid = daemon_pid(home)
    if pid is not None:
        try:
            with mvmclient.Client(autostart=False, timeout=15.0) as c:
                for s in c.list_sandboxes():
                    try:
                        c.down(s.name)
                    except (MvmError, OSError) as exc:
                        err.print(f"[yellow]down {s.name} failed: {exc}[/]")
                c.shutdown()
        except (MvmError, OSError) as exc:
            err.print(f"[yellow]could not stop mvmd cleanly: {exc}[/]")
        if not wait_gone(pid, DAEMON_STOP_WAIT):
            err.print(f"[yellow]mvmd (pid {pid}) did not exit; killing it[/]")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5.0)
    strays = kill_strays(str(home))
    if strays:
        err.print(f"[yellow]killed {strays} leftover QEMU process(es)[/]")
    for name in LINKED:  # unlink the shared store first: rmtree must never go through it
        link = home / name
        if link.is_symlink():
            link.unlink()
    shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def private_home(default_home: Path, prefix: str = "mvb-") -> Iterator[Path]:
    """``make_home`` and point ``MVM_HOME`` at it (before any Client exists: mvmd, started
    by the client, inherits the environment); ``cleanup`` at the end. On Ctrl-C (or
    SIGTERM, see raise_on_sigterm) it cleans up and exits with 130."""
    home = make_home(default_home, prefix)
    os.environ["MVM_HOME"] = str(home)
    try:
        yield home
    except KeyboardInterrupt:
        err.print("[red]interrupted; cleaning up[/]")
        cleanup(home)
        sys.exit(130)
    finally:
        if home.exists():
            cleanup(home)


# ------------------------------------------------------------------------ timing


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """``with timer() as t: ...; t()`` -> seconds since the block started."""
    t0 = time.perf_counter()
    yield lambda: time.perf_counter() - t0


# ------------------------------------------------------------------------ report


def fmt(v: float, unit: str, ms_digits: int = 2) -> str:
    if unit == "s":
        return f"{v:.3f} s"
    if unit == "ms":
        return f"{v:.{ms_digits}f} ms"
    return f"{v:.1f} {unit}"


def ratio(rows: dict[str, Row], a: str, b: str) -> dict[str, Any] | None:
    """median(a) / median(b), and the same ratio per round where both were measured."""
    ra, rb = rows[a], rows[b]
    if not ra.samples or not rb.samples or rb.median == 0:
        return None
    paired = [x / y for x, y in zip(ra.samples, rb.samples, strict=False) if y > 0]
    return {
        "of_medians": ra.median / rb.median,
        "per_round_min": min(paired) if paired else None,
        "per_round_max": max(paired) if paired else None,
    }


def compute_ratios(
    rows: dict[str, Row], specs: Iterable[tuple[str, str, str, str]]
) -> dict[str, Any]:
    """``specs``: (name, numerator, denominator, how to read it); pairs without samples
    are left out."""
    out: dict[str, Any] = {}
    for name, a, b, how in specs:
        r = ratio(rows, a, b)
        if r is not None:
            out[name] = {**r, "numerator": a, "denominator": b, "reads_as": how}
    return out


def json_report(
    facts: dict[str, Any], rows: dict[str, Row], ratios: dict[str, Any], **counts: int
) -> str:
    """The --json output: host facts, ``counts`` (rounds, ...), rows and ratios."""
    return json.dumps(
        {
            "host": facts,
            **counts,
            "rows": {k: r.to_json() for k, r in rows.items()},
            "ratios": ratios,
        },
        indent=2,
    )


def report_console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120)


def host_table(facts: dict[str, Any], keys: Iterable[str]) -> Table:
    hosts = Table(title="host", show_header=False, title_justify="left")
    hosts.add_column(style="bold")
    hosts.add_column()
    for k in keys:
        v = facts[k]
        if k == "accel":
            v = f"{v} ({facts['accel_reason']})"
        hosts.add_row(k, str(v))
    la0, la1 = facts["loadavg_start"], facts["loadavg_end"]
    hosts.add_row("loadavg", f"{la0[0]:.2f} at start, {la1[0]:.2f} at end (1 min)")
    hosts.add_row("wall time", f"{facts['wall_seconds']:.1f} s")
    return hosts


def samples_table(title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("measurement")
    t.add_column("n", justify="right")
    for col in ("median", "min", "max"):
        t.add_column(col, justify="right")
    return t


def add_sample_row(t: Table, number: str, row: Row, ms_digits: int = 2) -> None:
    s = row.samples
    if not s:
        t.add_row(number, row.label, "0", "-", "-", "-")
        return
    t.add_row(
        number,
        row.label,
        str(len(s)),
        fmt(row.median, row.unit, ms_digits),
        fmt(min(s), row.unit, ms_digits),
        fmt(max(s), row.unit, ms_digits),
    )


def ratios_table(ratios: dict[str, Any], unpaired: Collection[str] = ()) -> Table:
    """The ratios; no per-round range where the denominator is in ``unpaired`` (its
    samples were not taken in step with the numerator's)."""
    rt = Table(title="ratios (of medians; per-round range in brackets)", title_justify="left")
    rt.add_column("comparison")
    rt.add_column("ratio", justify="right")
    rt.add_column("per round", justify="right")
    for name, r in ratios.items():
        per = "-"
        if r["denominator"] not in unpaired and r["per_round_min"] is not None:
            per = f"[{r['per_round_min']:.2f}-{r['per_round_max']:.2f}]"
        rt.add_row(name, f"{r['of_medians']:.2f}{r['reads_as']}", per)
    return rt


def plain_once(memory_mb: int) -> float:
    """The floor beside a browser or desktop create: a plain python sandbox of the same
    memory, created and answering one exec (seconds)."""
    import mvm

    t0 = time.perf_counter()
    sb = mvm.Sandbox.create("python", resources=mvm.resources(memory_mb=memory_mb))
    try:
        sb.commands.run(["true"], check=True)
        return time.perf_counter() - t0
    finally:
        sb.kill()


def patient(img: Image) -> Image:
    """The image with its warm recipe's probe wait at the maximum: on a host shared by many
    VMs a cold start can outlast the recipe's own bound (this changes no template)."""
    import msgspec

    from mvm.warm import MAX_TIMEOUT

    w = img.manifest.warm
    assert w is not None
    warm = msgspec.structs.replace(w, timeout=MAX_TIMEOUT)
    return msgspec.structs.replace(img, manifest=msgspec.structs.replace(img.manifest, warm=warm))
