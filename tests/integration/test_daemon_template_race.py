"""mvmd must keep serving while two sandboxes of a new shape boot at once.

The first VM of a shape makes the shape's boot template, under a file lock per template
(``TemplateStore.lock``). In mvmd every create runs on one event loop, so waiting for that
lock must never block the loop. This module gets its own MVM_HOME with *no* boot templates
(root filesystems, kernels and initramfs are shared with the default store): both ``up``
calls below then need the same template that does not exist yet.

Bounded: the test polls the daemon while the two ``up`` run and stops as soon as the
daemon has not answered for a while; everything it started is killed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.mvmd_home import MVMCTL, SHARED, private_home

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

#: Status calls in a row that mvmd may leave unanswered before the test calls it blocked.
SILENT_TRIES = 5


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    no_templates = tuple(n for n in SHARED if n != "templates")
    with private_home("mvmtr-", share=no_templates) as home:
        e = {**os.environ, "MVM_HOME": str(home)}
        e.pop("MVM_RUN_DIR", None)
        yield e


def daemon_answers(env: dict[str, str]) -> bool:
    p = subprocess.run(
        [*MVMCTL, "daemon", "status", "--json"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return p.returncode == 0 and json.loads(p.stdout).get("pid") is not None


def test_two_ups_that_both_need_a_new_template(env: dict[str, str]) -> None:
    start = subprocess.run(
        [*MVMCTL, "daemon", "start"], env=env, capture_output=True, timeout=60, check=False
    )
    assert start.returncode == 0, start.stderr
    ups = [
        subprocess.Popen(
            [*MVMCTL, "up", "--name", name, "--memory", "256", "--ttl", "5m"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("race-a", "race-b")
    ]
    silent = 0
    try:
        deadline = time.monotonic() + 150
        while any(p.poll() is None for p in ups) and time.monotonic() < deadline:
            # each try waits up to 5 s for an answer; a loop blocked on the template lock
            # is silent for the whole template build, so SILENT_TRIES in a row (half a
            # minute or more) catch it while a merely slow, loaded host does not fail
            if daemon_answers(env):
                silent = 0
            else:
                silent += 1
                if silent >= SILENT_TRIES:
                    break
            time.sleep(1)
        assert silent < SILENT_TRIES, "mvmd stopped answering while the sandboxes were created"
        outs = [p.communicate(timeout=60) for p in ups]
        assert [p.returncode for p in ups] == [0, 0], outs
        listing = subprocess.run(
            [*MVMCTL, "ls", "--json"], env=env, capture_output=True, timeout=60, check=True
        )
        states = {s["name"]: s["state"] for s in json.loads(listing.stdout)}
        assert states == {"race-a": "running", "race-b": "running"}
    finally:
        for p in ups:
            if p.poll() is None:
                p.kill()
                p.wait(10)
