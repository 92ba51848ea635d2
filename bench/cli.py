"""CLI benchmark: whole ``mvmctl`` processes beside their floors, from one run.

Run: ``.venv/bin/python bench/cli.py [--rounds 7] [--run-rounds 3] [--no-instructions]
[--no-compile] [--json]``

``mvmctl`` is the installed console script beside this Python (what a user runs), else
``python -m mvm.cli.main``. mvm's bytecode is compiled first (``compileall`` on the package
imported; ``--no-compile`` skips it): an installed package has it, but a source tree run
with ``PYTHONDONTWRITEBYTECODE`` set (as here) would compile every module it imports on
every command and measure the compiler.

- ``mvmctl exec NAME -- true`` against Python's start plus one raw exec request to mvmd
  (a ``python -c`` that writes the HTTP request on the socket by hand and reads the
  answer: no mvm code). Target: <= 1.5x.
- ``mvmctl ls`` against Python's start plus one raw ``GET /v1/sandboxes``.
- ``mvmctl --help`` against ``python -c pass``.
- ``mvmctl run -- true`` against an in-process template restore + exec ``true``
  (``MicroVM.boot(fast=True)``, then ``agent.exec``; destroy not timed). Target: <= 1.5x.

Each figure and its floor run in turn, round by round, so host noise hits both; the ratio
is of medians (wall). Wall time and the process's CPU time (user + sys, from
``getrusage``; for the in-process floor of ``run``: none, ``nan``) are both printed: on a
loaded host the CPU time is the steadier sign of what the CLI itself costs. Steadier still:
the instructions the client process itself executes (``valgrind --tool=callgrind``, one run
each of figure and floor, not mvmd's nor the guest's), the same under any load; skipped
without valgrind or with ``--no-instructions``.
Against a private ``MVM_HOME`` (``/tmp/mvcl-*``) linked to the current store; removed at the
end with its mvmd and QEMUs.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mvm
from common import default_store, private_home, raise_on_sigterm
from mvm import paths
from mvm.api import models as M
from mvm.client import Client
from mvm.images.store import ImageStore
from mvm.vm import MicroVM, VMSpec

OP_TIMEOUT = 120.0
SCRIPT = Path(sys.executable).parent / "mvmctl"
MVMCTL = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mvm.cli.main"]

#: Python start + one request written by hand on mvmd's socket (no mvm imports).
RAW = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["MVM_HOME"] + "/mvmd.sock")
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
head = f"{method} {path} HTTP/1.1\r\nHost: mvmd\r\nConnection: close\r\n"
if body:
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
s.sendall(head.encode() + b"\r\n" + body)
buf = b""
while chunk := s.recv(65536):
    buf += chunk
assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
"""


def proc(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, timeout=OP_TIMEOUT, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr[-500:]!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def instructions(argv: list[str]) -> float:
    """Instructions the process ``argv`` itself executes (callgrind; not its children)."""
    with tempfile.TemporaryDirectory(prefix="mvcl-cg-") as d:
        out = Path(d) / "cg.out"
        r = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
            capture_output=True,
            timeout=OP_TIMEOUT * 5,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"callgrind {argv} exited {r.returncode}: {r.stderr[-500:]!r}")
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return float(line.split()[1])
    raise RuntimeError(f"callgrind wrote no totals for {argv}")


async def restore_exec(spec: VMSpec, store: ImageStore) -> tuple[float, float]:
    t0 = time.perf_counter()
    vm = await MicroVM.boot(spec, store=store, fast=True)
    try:
        assert vm.agent is not None
        r = await vm.agent.exec(["true"], timeout=OP_TIMEOUT)
        took = time.perf_counter() - t0
        assert r.exit_code == 0 and vm.restored
    finally:
        await vm.destroy()
    return took, float("nan")


PAIRS: list[tuple[str, str, str, float | None]] = [
    # (row, figure label, floor label, target ratio)
    ("exec", "`mvmctl exec NAME -- true`", "python start + raw exec request", 1.5),
    ("ls", "`mvmctl ls`", "python start + raw GET /sandboxes", None),
    ("help", "`mvmctl --help`", "`python -c pass`", None),
    ("run", "`mvmctl run -- true`", "in-process template restore + exec", 1.5),
]


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[tuple[float, float]]]]:
    py = [sys.executable]
    name = "clib"
    with Client() as c:
        c.create(M.CreateSandbox(name=name, ttl_seconds=3600))
        for _ in range(2):  # first exec after a restore is TCG's translation: not a sample
            proc([*MVMCTL, "exec", name, "--", "true"])
    exec_body = json.dumps({"argv": ["true"]})
    argvs = {
        "exec": (
            [*MVMCTL, "exec", name, "--", "true"],
            [*py, "-c", RAW, "POST", f"/v1/sandboxes/{name}/exec", exec_body],
        ),
        "ls": ([*MVMCTL, "ls"], [*py, "-c", RAW, "GET", "/v1/sandboxes", ""]),
        "help": ([*MVMCTL, "--help"], [*py, "-c", "pass"]),
    }
    ops: dict[str, tuple[Callable[[], tuple[float, float]], Callable[[], tuple[float, float]]]]
    ops = {k: (lambda a=fig: proc(a), lambda b=floor: proc(b)) for k, (fig, floor) in argvs.items()}
    out: dict[str, dict[str, list[tuple[float, float]]]] = {
        k: {"figure": [], "floor": []} for k, *_ in PAIRS
    }
    if args.instructions:
        for key, (fig, floor) in argvs.items():
            out[key]["figure_ir"] = [(instructions(fig), 0.0)]
            out[key]["floor_ir"] = [(instructions(floor), 0.0)]
    for n in range(args.rounds):
        for key, (fig, floor) in ops.items():
            first, second = (fig, floor) if n % 2 == 0 else (floor, fig)
            a, b = first(), second()
            out[key]["figure"].append(a if n % 2 == 0 else b)
            out[key]["floor"].append(b if n % 2 == 0 else a)
    store = ImageStore()
    spec = VMSpec(store.ensure("python"))
    asyncio.run(restore_exec(spec, store))  # template made here if missing: not a sample
    proc([*MVMCTL, "run", "--", "true"])
    for _ in range(args.run_rounds):
        out["run"]["figure"].append(proc([*MVMCTL, "run", "--", "true"]))
        out["run"]["floor"].append(asyncio.run(restore_exec(spec, store)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--run-rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-instructions", dest="instructions", action="store_false")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        args.instructions = False
    raise_on_sigterm()
    package = Path(mvm.__file__).parent
    if args.compile:
        compileall.compile_dir(package, quiet=1)
    store = paths.home() if "MVM_HOME" in os.environ else default_store()
    with private_home(store, prefix="mvcl-"):
        data = measure(args)
    med = {
        k: {side: statistics.median(w for w, _ in v) for side, v in d.items()}
        for k, d in data.items()
    }
    cpu = {
        k: {side: statistics.median(c for _, c in v) for side, v in d.items()}
        for k, d in data.items()
    }
    if args.json:
        print(json.dumps({"args": vars(args), "samples": data, "median_wall": med, "cpu": cpu}))
        return
    t = Table(title=f"whole mvmctl processes vs their floors (median of {args.rounds})")
    cols = ["figure", "wall s", "CPU s", "floor", "floor wall s", "floor CPU s", "ratio"]
    if args.instructions:
        cols += ["instr. M", "floor instr. M", "instr. ratio"]
    for col in [*cols, "target"]:
        t.add_column(col, justify="left" if col in ("figure", "floor") else "right")
    for key, label, floor_label, target in PAIRS:
        fig, flo = med[key]["figure"], med[key]["floor"]
        row = [
            label,
            f"{fig:.3f}",
            f"{cpu[key]['figure']:.3f}",
            floor_label,
            f"{flo:.3f}",
            f"{cpu[key]['floor']:.3f}",
            f"{fig / flo:.2f}x",
        ]
        if args.instructions:
            if "figure_ir" in data[key]:
                a, b = data[key]["figure_ir"][0][0], data[key]["floor_ir"][0][0]
                row += [f"{a / 1e6:.0f}", f"{b / 1e6:.0f}", f"{a / b:.2f}x"]
            else:
                row += ["-", "-", "-"]
        t.add_row(*row, f"<= {target}x" if target else "-")
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(t)
    load = os.getloadavg()[0]
    console.print(
        f"load average {load:.1f} on {os.cpu_count()} CPUs; mvmctl = {' '.join(MVMCTL)}; "
        f"mvm from {package}; bytecode "
        + ("compiled first" if args.compile else "as found (--no-compile)")
    )


if __name__ == "__main__":
    main()
