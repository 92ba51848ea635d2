"""run_code on the ``python-data`` preset: a matplotlib figure comes back as a decodable
PNG and a pandas DataFrame as HTML. The image is built into the default store if it is
missing (a few minutes, once): a missing image is a failure, never a skip."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

import pytest

import mvm
from mvm.errors import SandboxNotFound
from mvm.images.store import ImageStore
from mvm.sdk import mode
from tests.integration.mvmd_home import default_home, private_home

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
    ImageStore(default_home()).ensure("python-data")  # before the home copies image records
    with private_home("mvdata-") as h:
        old = {k: os.environ.get(k) for k in ("MVM_HOME", "MVM_RUN_DIR", "MVM_SDK_MODE")}
        os.environ["MVM_HOME"] = str(h)
        for k in ("MVM_RUN_DIR", "MVM_SDK_MODE"):
            os.environ.pop(k, None)
        mode._backend = None
        sb = mvm.Sandbox.create("python-data", ttl="30m", resources=mvm.resources(memory_mb=1024))
        try:
            yield sb
        finally:
            try:
                sb.destroy()
            except SandboxNotFound:
                pass
            mode._backend = None
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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
