"""The guest's run_code programs run on the host's Python (they are stdlib-only scripts):
a Python and a bash context served over their Unix sockets, driven by the real client.
The behaviour inside a VM is covered by tests/integration/test_code.py; this catches a
broken script (a missing import, a protocol slip) in seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parents[2] / "src" / "mvm" / "agent" / "guest"


def client(head: dict[str, object], code: str = "") -> dict[str, object]:
    nonce = os.urandom(8).hex()
    data = json.dumps({**head, "nonce": nonce}) + "\n" + code
    p = subprocess.run(
        [sys.executable, "-I", "-S", str(GUEST / "code_client.py")],
        input=data.encode(),
        capture_output=True,
        timeout=60,
        check=True,
        start_new_session=True,
    )
    marker = f"\x1eMVMCODE:{nonce}\n".encode()
    out, _, rec = p.stdout.partition(marker)
    result: dict[str, object] = json.loads(rec)
    result["_stdout"] = out.decode()
    return result


@pytest.fixture
def contexts() -> object:
    suffix = os.urandom(4).hex()
    names = {"python": f"hp-{suffix}", "bash": f"hb-{suffix}"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *([] if lang == "python" else ["-I", "-S"]),
                str(GUEST / "code_server.py"),
                name,
                lang,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for lang, name in names.items()
    ]
    yield names
    for lang, name in names.items():
        client({"op": "kill", "context": name, "language": lang})
    for p in procs:
        p.kill()
        p.wait(timeout=10)
    d = Path(f"/tmp/.mvm-code-{os.getuid()}")
    for name in names.values():
        for f in d.glob(f"{name}*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_python_and_bash_contexts_on_the_host(contexts: dict[str, str]) -> None:
    py, sh = contexts["python"], contexts["bash"]
    first = client(
        {"context": py, "language": "python", "wait": 30},
        "import subprocess\nsubprocess.run(['echo', 'child'])\nprint('py')\nv = 6 * 7\nv",
    )
    assert first["status"] == "ok" and first["_stdout"] == "child\npy\n"
    assert first["value"] == {"text/plain": "42"}
    err = client(
        {"context": py, "language": "python"}, "display({'text/html': '<b/>'}, raw=True)\nv / 0"
    )
    assert err["outputs"] == [{"text/html": "<b/>"}]
    assert isinstance(err["error"], dict) and err["error"]["name"] == "ZeroDivisionError"
    start = time.monotonic()
    loop = client(
        {"context": py, "language": "python", "timeout": 1, "grace": 5}, "while True: pass"
    )
    assert loop["timed_out"] and isinstance(loop["error"], dict)
    assert loop["error"]["name"] == "KeyboardInterrupt" and time.monotonic() - start < 50
    assert client({"context": py, "language": "python"}, "v")["value"] == {"text/plain": "42"}
    wrong = client({"context": py, "language": "bash"}, "true")
    assert wrong["status"] == "wrong_language"

    assert (
        client({"context": sh, "language": "bash", "wait": 30}, "cd /tmp\nexport K=v")["status"]
        == "ok"
    )
    res = client({"context": sh, "language": "bash"}, 'echo "$PWD $K"; false')
    assert res["_stdout"] == "/tmp v\n" and res["exit_code"] == 1
    listed = client({"op": "list"})["contexts"]
    assert isinstance(listed, list) and {py, sh} <= set(listed)
    assert client({"context": sh, "language": "bash", "op": "kill"})["status"] == "killed"
    assert client({"context": sh, "language": "bash"}, "true")["status"] == "no_context"
