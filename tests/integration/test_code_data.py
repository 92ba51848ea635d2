"""run_code on the ``python-data`` preset: a matplotlib figure comes back as a decodable
PNG and a pandas DataFrame as HTML; the default context comes warm from the template (its
imports done, its PRNGs reseeded per sandbox); node contexts keep their state. The image
is built into the default store if it is missing (a few minutes, once): a missing image
is a failure, never a skip."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import pytest

import mvm
from mvm.errors import SandboxNotFound
from mvm.images.manifest import load_preset
from mvm.images.store import ImageStore
from tests.integration.code_home import sdk_home
from tests.integration.mvmd_home import default_home

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

PLOT = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
ax.plot([1, 3, 2])
plt.show()
fig2 = plt.figure(figsize=(2, 2), dpi=40)   # left open: shown at the end of the cell
plt.plot([0, 1])
print('plotted')
"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG after checking its chunks' CRCs and inflating its data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert (
            zlib.crc32(kind + body)
            == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        )
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert len(zlib.decompress(idat)) > 0
    return size


@pytest.fixture(scope="module")
def sandbox() -> Iterator[mvm.Sandbox]:
    # build, not ensure: an image recorded before the preset changed (its [warm] recipe)
    # is recorded afresh (its rootfs is reused); before the home copies image records.
    ImageStore(default_home()).build(load_preset("python-data"))
    with sdk_home("mvdata-"):
        sb = mvm.Sandbox.create("python-data", ttl="30m", resources=mvm.resources(memory_mb=1024))
        try:
            yield sb
        finally:
            try:
                sb.destroy()
            except SandboxNotFound:
                pass


def test_matplotlib_figures_come_back_as_png(sandbox: mvm.Sandbox) -> None:
    res = sandbox.run_code(PLOT, timeout_seconds=600)
    assert res.ok, res.error
    assert res.stdout == "plotted\n"
    assert len(res.pngs) == 2  # one shown, one left open
    for p in res.pngs:
        w, h = png_size(p)
        assert 10 < w < 400 and 10 < h < 400
    again = sandbox.run_code("import matplotlib.pyplot as plt\nlen(plt.get_fignums())")
    assert again.text == "0"  # rendered figures are closed


def test_pandas_dataframe_has_html(sandbox: mvm.Sandbox) -> None:
    res = sandbox.run_code(
        "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})", timeout_seconds=600
    )
    assert res.ok, res.error
    assert res.text is not None and "a  b" in res.text
    assert "<table" in res.value["text/html"]
    assert any("text/html" in o for o in res.outputs)


def test_default_context_is_warm_with_its_own_prng(sandbox: mvm.Sandbox) -> None:
    # The template's recipe started the default context with the imports done (no cell
    # started it: the SDK never passes --preload), so a first cell pays for neither.
    res = sandbox.run_code(
        "import sys\n'--preload' in sys.argv, 'pandas' in sys.modules, 'numpy' in sys.modules"
    )
    assert res.text == "(True, True, True)", res
    # Every clone of the template resumed the same interpreter: each reseeds before its
    # first cell, so two sandboxes draw different numbers.
    draw = "import random, numpy\nrandom.getrandbits(64), int(numpy.random.randint(1 << 30))"
    with mvm.Sandbox.create(
        "python-data", ttl="10m", resources=mvm.resources(memory_mb=1024)
    ) as other:
        theirs = other.run_code(draw, timeout_seconds=600).text
    ours = sandbox.run_code(draw, timeout_seconds=600).text
    assert ours and theirs and ours != theirs
    a, b = (t.strip("()").split(", ") for t in (ours, theirs))
    assert a[0] != b[0] and a[1] != b[1]


def test_node_context_keeps_state(sandbox: mvm.Sandbox) -> None:
    ctx = sandbox.create_context("node")
    first = sandbox.run_code(
        "const os = require('os');\nlet count = 41;\nconsole.log('user', os.userInfo().uid);\n"
        "count + 1",
        context=ctx,
        timeout_seconds=600,
    )
    assert first.ok and first.stdout == "user 1000\n" and first.text == "42", first
    again = sandbox.run_code("count += 1; [count, typeof os.cpus]", context=ctx)
    assert again.text == "[ 42, 'function' ]", again
    err = sandbox.run_code("null.x", context=ctx)
    assert err.error is not None and err.error.name == "TypeError"
    assert "<cell 3>" in err.error.traceback
    loop = sandbox.run_code("for (;;) {}", context=ctx, timeout_seconds=3)
    assert loop.timed_out and loop.error is not None and loop.error.name == "KeyboardInterrupt"
    assert sandbox.run_code("count", context=ctx).text == "42"
    default = sandbox.run_code("1 + 1", language="node")  # the language's default context
    assert default.text == "2" and default.context == "node"
