"""Port-forward throughput: the same bytes fetched over HTTP through a forward vs `fs read`.

Run: ``.venv/bin/python bench/ports.py [--mib N] [--rounds N] [--json]``

One sandbox in a private, throw-away ``MVM_HOME`` (as bench/lifecycle.py: the image
store is shared through symlinks, nothing is rebuilt) holds a file of N MiB of random
bytes and runs ``python3 -m http.server`` on 127.0.0.1:8000 in the guest; a forward
makes it reachable from the host. Each round reads the file both ways (the order
alternates, so host noise spreads over both) and checks the SHA-256 of every copy.
At the end (also on Ctrl-C) the sandbox is removed, mvmd stopped, the home deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_store, private_home, raise_on_sigterm, timer
from mvm import client as mvmclient
from mvm.api import models as M

NAME = "bench-ports"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--mib", type=int, default=16, help="file size in MiB (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="reads each way (default 5)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.mib <= 60 or args.rounds < 1:
        ap.error("--mib must be in 1-60 and --rounds at least 1")

    raise_on_sigterm()
    with private_home(default_store()):
        os.environ.pop("MVM_RUN_DIR", None)
        data = os.urandom(args.mib << 20)
        want = hashlib.sha256(data).hexdigest()
        times: dict[str, list[float]] = {"forward": [], "fs read": []}
        with mvmclient.Client() as c:
            c.create(M.CreateSandbox(name=NAME, image="python", ttl_seconds=1800))
            c.write_file(NAME, "/work/blob.bin", data)
            c.proc_start(
                NAME,
                M.ProcStart(argv=["python3", "-m", "http.server", "8000", "-b", "127.0.0.1"]),
            )
            fwd = c.forward(NAME, M.PortSpec(guest_port=8000))
            url = f"http://127.0.0.1:{fwd.host_port}/blob.bin"
            deadline = time.monotonic() + 60
            while True:  # wait (bounded) for the guest server
                try:
                    if httpx.get(f"http://127.0.0.1:{fwd.host_port}/", timeout=10).is_success:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the guest http.server did not start")
                time.sleep(0.2)

            def via_forward() -> bytes:
                return httpx.get(url, timeout=300).content

            def via_fs() -> bytes:
                return c.read_file(NAME, "/work/blob.bin")

            ways = [("forward", via_forward), ("fs read", via_fs)]
            for rnd in range(args.rounds):
                for label, fn in ways if rnd % 2 == 0 else ways[::-1]:
                    with timer() as t:
                        got = fn()
                        dt = t()
                    if hashlib.sha256(got).hexdigest() != want:
                        raise SystemExit(f"{label}: wrong bytes in round {rnd}")
                    times[label].append(dt)

    mb = len(data) / 1e6
    rates = {k: [mb / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "bytes": len(data),
        "rounds": args.rounds,
        "mb_per_s": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in rates.items()},
        "forward_vs_fs_read": med["forward"] / med["fs read"],
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{args.mib} MiB, {args.rounds} rounds, sha256 checked")
    for col in ("path", "MB/s median", "min", "max"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for k, v in rates.items():
        table.add_row(k, f"{med[k]:.1f}", f"{min(v):.1f}", f"{max(v):.1f}")
    Console().print(table)
    print(f"forward / fs read = {result['forward_vs_fs_read']:.2f}")


if __name__ == "__main__":
    main()
