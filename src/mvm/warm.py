"""Warm templates: a boot template made *after* a declared setup step, not just at agent-ready.

An image may declare a recipe in its manifest (``[warm]`` in a preset or ``mvm.toml``)::

    [warm]
    setup = ["sh", "-c", "exec chromium --headless ... >/tmp/chromium.log 2>&1"]
    probe = ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9222/json/version', timeout=2)"]
    timeout = 240

When a template of such an image is made, the VM is booted cold, ``setup`` is started as a
background process (as ``user``), ``probe`` is run in the guest until it exits 0 (each try
bounded, the whole wait bounded by ``timeout``), and only then is the VM snapshotted. Every
sandbox of that image restores with the setup already running (a browser already up, a
desktop already drawn). The recipe's hash is part of the template key, so changing the
recipe makes a new template. A VM that boots cold (templates off, or a restore that failed)
runs the same recipe before it is handed out, so the two paths give the same sandbox.

This module is the whole mechanism; ``vm.py`` only calls :func:`key_part` and :func:`prepare`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import TYPE_CHECKING

import msgspec

from mvm.errors import CommandTimeout, ManifestError, VMError

if TYPE_CHECKING:
    from mvm.agent.client import AgentClient
    from mvm.images.manifest import Warm

#: Bounds on a recipe (it is part of a manifest, which may come from a project directory).
MAX_ARGS = 256
MAX_ARG = 8192
MAX_TIMEOUT = 1800.0
#: One probe run may take this long before it counts as a failed try.
PROBE_TIMEOUT = 20.0
#: Pause between failed probes.
PROBE_INTERVAL = 0.5
USERS = ("user", "root")


def check_recipe(w: Warm, origin: str) -> None:
    """Refuse a recipe that cannot run (raises ManifestError naming ``origin``)."""
    for what, argv in (("setup", w.setup), ("probe", w.probe)):
        if not argv or len(argv) > MAX_ARGS:
            raise ManifestError(f"{origin}: [warm] {what} needs 1 to {MAX_ARGS} arguments")
        for a in argv:
            if "\0" in a or len(a) > MAX_ARG:
                raise ManifestError(f"{origin}: [warm] {what}: bad argument {a[:40]!r}")
    if not 0 < w.timeout <= MAX_TIMEOUT:
        raise ManifestError(f"{origin}: [warm] timeout must be in (0, {MAX_TIMEOUT:g}] seconds")
    if w.user not in USERS:
        raise ManifestError(f"{origin}: [warm] user must be one of {', '.join(USERS)}")


def recipe_hash(w: Warm) -> str:
    """What the template key adds for a recipe: a hash of everything in it."""
    doc = json.dumps(msgspec.to_builtins(w), sort_keys=True).encode()
    return hashlib.sha256(doc).hexdigest()[:32]


def key_part(w: Warm | None) -> str | None:
    return None if w is None else recipe_hash(w)


async def prepare(agent: AgentClient, w: Warm) -> float:
    """Run the recipe in a freshly booted guest: start ``setup``, wait for ``probe``.

    Returns the seconds it took. Raises VMError if the setup process exits, or the probe
    has not passed within ``timeout`` (the last probe's stderr tail is in the message).
    """
    started = time.monotonic()
    proc = await agent.proc_start(list(w.setup), user=w.user)
    deadline = started + w.timeout
    last = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VMError(
                f"warm recipe: probe did not pass within {w.timeout:g}s",
                hint="see the probe's last error in data['probe']; raise [warm] timeout",
                probe=last[-500:],
            )
        try:
            r = await agent.exec(
                list(w.probe), user=w.user, timeout=min(PROBE_TIMEOUT, left), output_limit=4096
            )
        except CommandTimeout:  # a busy guest answers late: a failed try, not a failure
            last = "probe timed out"
        else:
            if r.exit_code == 0:
                return time.monotonic() - started
            last = r.stderr.decode(errors="replace") or r.stdout.decode(errors="replace")
        info = await agent.proc_wait(proc.proc, 0)
        if not info.running:
            raise VMError(
                f"warm recipe: setup exited ({info.exit_code}) before the probe passed",
                hint="check the [warm] setup command in the image's manifest",
                exit_code=info.exit_code,
                probe=last[-500:],
            )
        await asyncio.sleep(min(PROBE_INTERVAL, max(0.0, deadline - time.monotonic())))
