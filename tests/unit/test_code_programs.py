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
from collections.abc import Callable
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parents[2] / "src" / "mvm" / "agent" / "guest"


def client(head: dict[str, object], code: str = "") -> dict[str, object]:
    """Run code_client.sh as the SDK does and return its record (plus ``_stdout``)."""
    nonce = os.urandom(16).hex()
    op, ctx = str(head.get("op", "run")), str(head.get("context", "python"))
    timeout = float(head.get("timeout", 300))  # type: ignore[arg-type]
    grace = float(head.get("grace", 5))  # type: ignore[arg-type]
    argv = ["bash", "--norc", "--noprofile", "-c", (GUEST / "code_client.sh").read_text()]
    argv += ["mvm-code", op, ctx, str(head.get("wait", 0)), f"{timeout + grace:.3f}", nonce]
    lang = head.get("language", "python")
    data = f"MVM1 {op} {ctx} {lang} {timeout:.3f} {nonce}\n{code}" if op == "run" else ""
    p = subprocess.run(
        argv,
        input=data.encode(),
        capture_output=True,
        timeout=120,
        check=True,
        start_new_session=True,
    )
    marker = f"\x1eMVMCODE:{nonce}\n".encode()
    out, _, rec = p.stdout.partition(marker)
    result: dict[str, object] = json.loads(rec)
    result["_stdout"] = out.decode()
    result["_stderr"] = p.stderr.decode()
    return result


def wait_for(cond: Callable[[], bool], seconds: float = 60) -> bool:
    """Poll ``cond`` until it holds or ``seconds`` pass (a bound, not a threshold)."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def clients_of(context: str) -> list[int]:
    """Pids of code_client.sh processes running a cell in ``context``."""
    needle = f"\0mvm-code\0run\0{context}\0".encode()
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and needle in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


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
        for f in d.glob(f"{name}.*"):
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
    # "it did not hang": the client's own bounded wait (120 s) fails the test otherwise
    loop = client(
        {"context": py, "language": "python", "timeout": 1, "grace": 5}, "while True: pass"
    )
    assert loop["timed_out"] and isinstance(loop["error"], dict)
    assert loop["error"]["name"] == "KeyboardInterrupt"
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


def test_a_stuck_cell_is_killed_and_cells_queue(contexts: dict[str, str]) -> None:
    py = contexts["python"]
    assert client({"context": py, "wait": 30}, "import time\nn = 1")["status"] == "ok"
    # Two cells at once: the second waits for the first (a queue, not an error).
    import concurrent.futures

    # No sleeps: the first cell says it has started and then holds until the second cell's
    # client is running (both bounded), so the second always comes while the first runs.
    started, go = (Path(f"/tmp/.{py}-{w}") for w in ("started", "go"))
    hold = (
        f"import os\nopen({str(started)!r}, 'w').close()\n"
        f"for _ in range(6000):\n    if os.path.exists({str(go)!r}): break\n"
        "    time.sleep(0.01)\nn += 1\nn"
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(client, {"context": py}, hold)
            assert wait_for(started.exists), "the first cell never started"
            fast = pool.submit(client, {"context": py}, "n * 10")
            assert wait_for(lambda: len(clients_of(py)) == 2), "the second client never ran"
            go.touch()
            assert slow.result()["value"] == {"text/plain": "2"}
            assert fast.result()["value"] == {"text/plain": "20"}
    finally:
        started.unlink(missing_ok=True)
        go.unlink(missing_ok=True)
    stuck = client(
        {"context": py, "timeout": 1, "grace": 2},
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('spin')\nwhile True: pass",
    )
    assert stuck["status"] == "killed" and stuck["timed_out"]
    assert stuck["_stdout"] == "spin\n"
    assert client({"context": py}, "1")["status"] == "no_context"


def test_preload_and_bad_requests(tmp_path: Path) -> None:
    name = f"hq-{os.urandom(4).hex()}"
    proc = subprocess.Popen(
        [sys.executable, str(GUEST / "code_server.py"), name, "python", "--preload", "json,x;y"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        res = client({"context": name, "wait": 30}, "import sys\n'json' in sys.modules")
        assert res["value"] == {"text/plain": "True"}
        bad = subprocess.run(
            ["bash", "-c", (GUEST / "code_client.sh").read_text(), "mvm-code", "run", "../x"],
            capture_output=True,
            timeout=30,
        )
        assert bad.returncode == 2 and b"bad arguments" in bad.stderr
    finally:
        client({"op": "kill", "context": name})
        proc.kill()
        proc.wait(timeout=10)
        for f in Path(f"/tmp/.mvm-code-{os.getuid()}").glob(f"{name}.*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()


def test_node_context_on_the_host() -> None:
    # install.sh installs Node.js on the host (the TypeScript SDK needs it)
    name = f"hn-{os.urandom(4).hex()}"
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(GUEST / "code_server.py"), name, "node"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    node = {"context": name, "language": "node"}
    try:
        first = client({**node, "wait": 60}, "let n = 6 * 7;\nconsole.log('hi');\nn")
        assert first["status"] == "ok" and first["_stdout"] == "hi\n", first
        assert first["value"] == {"text/plain": "42"}
        assert client(node, "const o = {a: [1, 2]}; n + 1")["value"] == {"text/plain": "43"}
        assert client(node, "Promise.resolve(o.a.length)")["value"] == {"text/plain": "2"}
        err = client(node, "function f() { throw new TypeError('bad') }\nf()")
        assert isinstance(err["error"], dict) and err["error"]["name"] == "TypeError"
        assert err["error"]["value"] == "bad" and "<cell 4>:1" in err["error"]["traceback"]
        loop = client({**node, "timeout": 1, "grace": 10}, "while (true) {}")
        assert loop["timed_out"] and isinstance(loop["error"], dict)
        assert loop["error"]["name"] == "KeyboardInterrupt"
        assert client(node, "n")["value"] == {"text/plain": "42"}  # the context lived on
        assert client({**node, "language": "python"}, "1")["status"] == "wrong_language"
    finally:
        client({"op": "kill", "context": name})
        proc.kill()
        proc.wait(timeout=10)
        for f in Path(f"/tmp/.mvm-code-{os.getuid()}").glob(f"{name}.*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
