"""``mvmctl`` as a user runs it: a subprocess per command, a real VM per ``run``.

Each ``run`` boots a VM, so they are few; the ``mvmctl`` fixture checks after every
``run`` that nothing (run directory, QEMU process) was left behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable

import pytest

from mvm.images.store import Image

#: Per test, fixture setup included: a first boot may have to make a boot template
#: (a cold boot under TCG on a loaded 2-core host).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(180), pytest.mark.usefixtures("run_dir_env")]

Mvmctl = Callable[..., subprocess.CompletedProcess[str]]


def test_run_prints_output_and_exits_zero(mvmctl: Mvmctl) -> None:
    r = mvmctl("run", "--timeout", "10", "--", "python3", "-c", "print(2 + 2)")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "4\n"


def test_run_separates_streams_and_keeps_exit_status(mvmctl: Mvmctl) -> None:
    r = mvmctl("run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "out\n"
    assert "err" in r.stderr
    assert "out" not in r.stderr


def test_run_json_is_one_object_with_the_result(mvmctl: Mvmctl, image: Image) -> None:
    started = time.monotonic()
    r = mvmctl("run", "--json", "--", "uname", "-r")
    wall = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert isinstance(obj, dict)
    assert obj["exit_code"] == 0
    assert obj["stdout"] == image.kernel_release + "\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", obj["stdout"])
    assert obj["stderr"] == ""
    # the command's duration lies inside the CLI's wall time (a consistency check, no limit)
    assert isinstance(obj["duration"], float) and 0 <= obj["duration"] <= wall
    assert obj["truncated"] == {"stdout": False, "stderr": False}
    assert re.fullmatch(r"sb-[0-9a-f]+", obj["sandbox_id"])


def test_run_unknown_command_exits_127_with_a_message(mvmctl: Mvmctl) -> None:
    r = mvmctl("run", "--", "no-such-cmd")
    assert r.returncode == 127
    assert "no-such-cmd" in r.stderr
    assert r.stdout == ""


def test_run_timeout_exits_124_and_destroys_the_vm(mvmctl: Mvmctl) -> None:
    # sleep 600 against the fixture's bound of 180 s: a timeout that never fired fails
    r = mvmctl("run", "--timeout", "2", "--", "sleep", "600", timeout=180)
    assert r.returncode == 124, r.stderr
    assert "timed out" in r.stderr
    # the fixture checked: no run directory and no QEMU process left for the sandbox


def test_run_env_user_and_cwd_options(mvmctl: Mvmctl) -> None:
    r = mvmctl(
        "run",
        "-e",
        "FOO=bar",
        "-e",
        "EMPTY=",
        "--user",
        "root",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$FOO"; echo "[$EMPTY]"; id -u; pwd',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["bar", "[]", "0", "/tmp"]


def test_run_interactive_forwards_stdin(mvmctl: Mvmctl) -> None:
    data = "line one\nline two\n" + "x" * 10000 + "\n"
    r = mvmctl("run", "-i", "--", "cat", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_run_cpus_and_memory(mvmctl: Mvmctl) -> None:
    r = mvmctl(
        "run", "--cpus", "2", "--memory", "256", "--", "sh", "-c", "nproc; cat /proc/meminfo"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "2"
    mem_kib = int(next(line for line in lines if line.startswith("MemTotal:")).split()[1])
    assert 128 * 1024 < mem_kib < 256 * 1024


def test_run_bad_usage_is_exit_2(mvmctl: Mvmctl) -> None:
    """Refused before any VM is booted."""
    r = mvmctl("run", "-e", "NOEQUALS", "--", "true")
    assert r.returncode == 2
    assert "NOEQUALS" in r.stderr
    r = mvmctl("run", "--cpus", "0", "--", "true")
    assert r.returncode == 2
    r = mvmctl("run", "-i", "--", "cat", input="x" * (1024 * 1024 + 1))
    assert r.returncode == 2
    assert "stdin" in r.stderr


def test_doctor_json(mvmctl: Mvmctl) -> None:
    r = mvmctl("doctor", "--json", timeout=60)
    obj = json.loads(r.stdout)
    assert obj["ok"] is True, [c for c in obj["checks"] if c["status"] == "fail"]
    assert r.returncode == 0
    names = {c["name"] for c in obj["checks"]}
    assert {"qemu", "accelerator", "images"} <= names
    for c in obj["checks"]:
        assert c["status"] in ("ok", "warn", "fail")
        assert isinstance(c["detail"], str)


def test_images_json_lists_the_default_image(mvmctl: Mvmctl, image: Image) -> None:
    r = mvmctl("images", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    imgs = json.loads(r.stdout)
    by_name = {i["name"]: i for i in imgs}
    assert "python-3.11" in by_name
    rec = by_name["python-3.11"]
    assert {"python", "default"} <= set(rec["aliases"])
    assert rec["rootfs_bytes"] > 0
    assert rec["kernel_release"] == image.kernel_release
