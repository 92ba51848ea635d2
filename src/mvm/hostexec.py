"""Running host tools (apt, dpkg-deb, mmdebstrap, mkfs) with clear, bounded failures."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mvm.errors import HostError, ImageBuildError

#: Debian package that provides each host tool, for the error hint.
TOOL_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "busybox": "busybox-static",
    "lz4": "lz4",
    "zstd": "zstd",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}


def which(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pkg = TOOL_PACKAGES.get(tool.rsplit("/", 1)[-1], tool)
        raise HostError(
            f"{tool} is not installed",
            hint=f"install it with `apt-get install {pkg}` (or run ./install.sh)",
            tool=tool,
        )
    return path


def run(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Run a host tool; return its stdout. Raise ImageBuildError with its last output on failure.

    ``on_line`` receives each line of stderr as it comes (progress for long steps).
    """
    exe = which(argv[0])
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            [exe, *argv[1:]],
            cwd=cwd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise ImageBuildError(f"{what}: cannot start {argv[0]}: {exc}") from None
    assert proc.stdout is not None and proc.stderr is not None

    out_chunks: list[bytes] = []

    def read_out() -> None:
        assert proc.stdout is not None
        out_chunks.append(proc.stdout.read())

    t = threading.Thread(target=read_out, daemon=True)
    t.start()
    if stdin is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass

    deadline = time.monotonic() + timeout
    for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        tail.append(line)
        del tail[:-20]
        if on_line is not None and line:
            on_line(line)
        if time.monotonic() > deadline:
            break
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ImageBuildError(f"{what}: timed out after {timeout:.0f}s") from None
    t.join(5)
    if rc != 0:
        detail = "\n".join(tail[-10:])
        raise ImageBuildError(f"{what} failed (exit {rc}):\n{detail}", step=what, tool_exit=rc)
    return b"".join(out_chunks).decode(errors="replace")
