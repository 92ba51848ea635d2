"""run_code against real VMs: persistent state, streaming, rich outputs, errors, timeouts,
isolated contexts, bash, redaction, bounds, the CLI and asyncio.

One sandbox (``shared``) serves every test (VMs are slow under TCG); each test uses its own
context ids where state matters, so the tests do not depend on their order. The module runs
its own mvmd under a private ``MVM_HOME`` (see mvmd_home.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import mvm
from mvm.errors import InvalidArgument, SandboxNotFound
from mvm.sdk.code import MAX_CODE, code_for
from tests.integration.code_home import home_fixture

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

SECRET_VALUE = "c0de-s3cr3t-" + os.urandom(6).hex()

#: A cell defining an object that offers a 2x1 PNG (red, blue) built with the stdlib only.
PNG_CELL = r"""
import struct, zlib
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
class Swatch:
    def _repr_png_(self):
        raw = b"\x00" + bytes([255, 0, 0, 0, 0, 255])
        head = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))
    def _repr_html_(self):
        return "<b>swatch</b>"
"""


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


home = home_fixture("mvcode-")


def mvmctl(home: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvm.cli.main", *args],
        env={**os.environ, "MVM_HOME": str(home)},
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def shared(home: Path) -> Iterator[mvm.Sandbox]:
    r = mvmctl(home, "secret", "put", "code-key", input=SECRET_VALUE + "\n")
    assert r.returncode == 0, r.stderr
    sb = mvm.Sandbox.create(
        "python-3.11",
        name="code-shared",
        ttl="30m",
        resources=mvm.resources(cpu_cores=1, memory_mb=1024),
        env={"API_KEY": mvm.secret("code-key")},
    )
    try:
        yield sb
    finally:
        try:
            sb.destroy()
        except SandboxNotFound:
            pass


def test_state_survives_and_output_streams(shared: mvm.Sandbox) -> None:
    ctx = shared.create_context()
    first = shared.run_code("import os\nos.chdir('/tmp')\nx = 41\nx + 1", context=ctx)
    assert first.ok and first.text == "42" and first.exec_count == 1
    again = shared.run_code("x + 1, os.getcwd()", context=ctx)
    assert again.text == "(42, '/tmp')" and again.exec_count == 2

    # Streaming: the callback answers the first line by writing a file the cell waits for;
    # had the output only come at the end, the cell would never see it.
    seen: list[str] = []

    def on_stdout(text: str) -> None:
        seen.append(text)
        if "first" in text and not shared.files.exists("/tmp/go"):
            shared.files.write("/tmp/go", "go")

    cell = (
        "import time, os\nprint('first', flush=True)\n"
        "for _ in range(600):\n    if os.path.exists('/tmp/go'): break\n    time.sleep(0.1)\n"
        "print('second' if os.path.exists('/tmp/go') else 'never streamed')"
    )
    res = shared.run_code(cell, context=ctx, on_stdout=on_stdout, timeout_seconds=120)
    assert res.stdout == "first\nsecond\n", res
    assert "".join(seen) == res.stdout
    err = shared.run_code("import sys; print('to err', file=sys.stderr)", context=ctx)
    assert err.stderr == "to err\n" and err.stdout == ""


def test_rich_outputs_png_html_json(shared: mvm.Sandbox) -> None:
    ctx = shared.create_context()
    assert shared.run_code(PNG_CELL, context=ctx).ok
    res = shared.run_code(
        "display({'application/json': '{\"a\": 1}'}, raw=True)\nSwatch()", context=ctx
    )
    assert res.ok, res
    assert res.text is not None and res.text.startswith("<__main__.Swatch object")
    assert res.value["text/html"] == "<b>swatch</b>"
    assert res.outputs[0] == {"application/json": '{"a": 1}'}
    assert res.png is not None
    width, height, raw = decode_png(res.png)
    assert (width, height) == (2, 1)
    assert raw == b"\x00" + bytes([255, 0, 0, 0, 0, 255])


def test_exception_carries_traceback(shared: mvm.Sandbox) -> None:
    ctx = shared.create_context()
    res = shared.run_code("def f(n):\n    return 10 // n\n\nf(0)", context=ctx)
    assert res.status == "error" and res.error is not None
    assert res.error.name == "ZeroDivisionError"
    assert res.error.value == "integer division or modulo by zero"
    tb = res.error.traceback
    assert '<cell 1>", line 4' in tb and '<cell 1>", line 2, in f' in tb
    assert "return 10 // n" in tb and "code_server" not in tb
    syntax = shared.run_code("def broken(:\n", context=ctx)
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    assert shared.run_code("1 + 1", context=ctx).text == "2"


def test_timeout_interrupts_then_kills_stubborn_cells(shared: mvm.Sandbox) -> None:
    ctx = shared.create_context()
    shared.run_code("kept = 'state'", context=ctx)
    loop = shared.run_code("while True:\n    pass", context=ctx, timeout_seconds=3)
    assert loop.status == "error" and loop.timed_out
    assert loop.error is not None and loop.error.name == "KeyboardInterrupt"
    assert shared.run_code("kept", context=ctx).text == "'state'"  # interrupted, not killed

    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    res = shared.run_code(stubborn, context=ctx, timeout_seconds=3)
    assert res.killed and res.timed_out
    after = shared.run_code("'kept' in globals()", context=ctx)
    assert after.ok and after.text == "False"  # a fresh interpreter


def test_ten_contexts_stay_isolated(shared: mvm.Sandbox) -> None:
    ctxs = [shared.create_context() for _ in range(10)]
    assert len({c.id for c in ctxs}) == 10
    for i, c in enumerate(ctxs):
        assert shared.run_code(f"import os\nvalue = {i}\nos.getpid()", context=c).ok
    pids = set()
    for i, c in enumerate(ctxs):
        res = shared.run_code("value, os.getpid()", context=c)
        value, pid = res.text.strip("()").split(", ")  # type: ignore[union-attr]
        assert int(value) == i
        pids.add(pid)
    assert len(pids) == 10
    assert {c.id for c in ctxs} <= set(code_for(shared).list_contexts())


def test_bash_context_keeps_cd_and_exports(shared: mvm.Sandbox) -> None:
    ctx = shared.create_context("bash")
    first = shared.run_code(
        "mkdir -p /tmp/bashdir && cd /tmp/bashdir\nexport GREETING=hi", context=ctx
    )
    assert first.ok, first
    res = shared.run_code('echo "$PWD $GREETING"; f() { echo fn; }', context=ctx)
    assert res.stdout == "/tmp/bashdir hi\n"
    assert shared.run_code("f; false", context=ctx).exit_code == 1
    loop = shared.run_code("while :; do :; done", context=ctx, timeout_seconds=3)
    assert loop.timed_out and loop.exit_code == 130
    assert shared.run_code("echo $GREETING", context=ctx).stdout == "hi\n"


def test_runs_unprivileged_with_private_sockets(shared: mvm.Sandbox) -> None:
    res = shared.run_code(
        "import os, stat\nst = os.stat(f'/tmp/.mvm-code-{os.getuid()}')\n"
        "os.getuid(), oct(stat.S_IMODE(st.st_mode)), st.st_uid"
    )
    assert res.text == "(1000, '0o700', 1000)"


def test_secrets_are_redacted(shared: mvm.Sandbox) -> None:
    res = shared.run_code("import os\nprint(os.environ['API_KEY'])\nos.environ['API_KEY']")
    assert SECRET_VALUE not in res.stdout and SECRET_VALUE not in (res.text or "")
    assert "[REDACTED:code-key]" in res.stdout
    assert "[REDACTED:code-key]" in (res.text or "")


def test_bounds_and_bad_arguments(shared: mvm.Sandbox) -> None:
    with pytest.raises(InvalidArgument):
        shared.run_code("x" * (MAX_CODE + 1))
    with pytest.raises(InvalidArgument):
        shared.run_code("1", language="cobol")
    with pytest.raises(InvalidArgument):
        shared.run_code("1", context="../etc")
    bash = shared.create_context("bash")
    with pytest.raises(InvalidArgument, match="bash context"):
        shared.run_code("1", language="python", context=bash.id)
    big = shared.run_code("print('y' * (5 * 1024 * 1024))", timeout_seconds=120)
    assert big.truncated and len(big.stdout) <= 4 * 1024 * 1024 + 1


def test_restart_context_drops_state(shared: mvm.Sandbox) -> None:
    ctx = shared.create_context()
    shared.run_code("gone = 1", context=ctx)
    shared.restart_context(ctx)
    assert shared.run_code("'gone' in globals()", context=ctx).text == "False"


def test_cli_run_code(shared: mvm.Sandbox, home: Path, tmp_path: Path) -> None:
    cell = tmp_path / "cell.py"
    cell.write_text("import sys\nprint('cli out')\ncli_value = 7\ncli_value * 6\n")
    r = mvmctl(home, "run-code", shared.name, "-f", str(cell), "--context", "cli")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "cli out\n42\n"
    r = mvmctl(home, "run-code", shared.name, "--context", "cli", "--json", "-c", "cli_value / 0")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["status"] == "error" and out["error"]["name"] == "ZeroDivisionError"
    r = mvmctl(home, "run-code", shared.name, "--language", "bash", input="echo $((6 * 7))\n")
    assert r.returncode == 0 and r.stdout == "42\n", r.stderr


def test_async_run_code(shared: mvm.Sandbox) -> None:
    async def main() -> list[str | None]:
        sb = await mvm.AsyncSandbox.connect(shared.name)
        a, b = await sb.create_context(), await sb.create_context()
        await asyncio.gather(sb.run_code("v = 'a'", context=a), sb.run_code("v = 'b'", context=b))
        results = await asyncio.gather(sb.run_code("v", context=a), sb.run_code("v", context=b))
        return [r.text for r in results]

    assert asyncio.run(main()) == ["'a'", "'b'"]
