"""Record mode, the IR and its schema, plan mode and compile: all without a VM."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import mvm
from mvm.errors import ImageNotFound, InvalidArgument, MvmError
from mvm.policy import admission
from mvm.sdk import ir as IRm
from mvm.sdk import plan as planmod
from mvm.sdk.record import Recorder
from mvm.sdk.replay import Replayer
from mvm.sdk.sandbox import Sandbox, build_spec
from tests.cookbook import COOKBOOK

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "ir-v1.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)


def make(rec: Recorder, base: Path, image: str = "python-3.11", **kw: Any) -> Sandbox:
    args: dict[str, Any] = {
        "name": None,
        "workload_id": "agent-tool",
        "ttl": "30m",
        "include": (),
        "tags": {"team": "x"},
        "resources": mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024),
        "network": mvm.network(mode="deny"),
        "env": {"MODE": "dev"},
        "base": base,
    }
    args.update(kw)
    return Sandbox._create(build_spec(image, **args), backend=rec)


def script_like(rec: Recorder, base: Path) -> None:
    """Every SDK call once, as a script would make them."""
    (base / "src").mkdir(exist_ok=True)
    (base / "src" / "lib.py").write_text("print('lib')\n")
    with make(rec, base, include=["src"]) as sb:
        sb.files.write("/app/main.py", "print('hello from mvm')")
        h = sb.commands.start(
            ["python", "/app/main.py"], env={"API_KEY": mvm.secret("api-key")}, stdin_open=True
        )
        h.send_stdin(b"data", eof=True)
        assert list(h.stdout) == []
        h.wait()
        h.kill()
        res = sb.commands.run(["python", "/app/main.py"], timeout_seconds=30, check=True)
        assert res.placeholder and mvm.is_placeholder(res.stdout)
        assert "only known in live mode" in res.stdout
        data = sb.files.read("/work/output.json")
        assert isinstance(data, bytes) and mvm.is_placeholder(data)
        assert sb.files.list("/work") == []
        assert sb.files.exists("/work/x")
        sb.files.mkdir("/work/d")
        sb.files.rename("/work/d", "/work/e")
        sb.files.remove("/work/e", recursive=True)
        assert list(sb.logs(follow=True)) == []
        fwd = sb.ports.forward(guest_port=8000, host_port=8080)
        fwd.close()
        snap = sb.snapshot("after-index")
        sb.pause()
        sb.resume(snapshot=snap.id)
        sb.set_ttl("1h")
        sb.destroy()


def test_recording_covers_every_call_and_matches_the_schema(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "rec", script="s.py")
    script_like(rec, tmp_path)
    path = rec.save()
    doc = json.loads(path.read_bytes())
    VALIDATOR.validate(doc)
    ir = IRm.load(tmp_path / "rec")
    ops = [o.op for o in ir.operations]
    assert ops[0] == "sandbox.create" and ops[-1] == "sandbox.stop"
    assert {
        "files.write",
        "commands.start",
        "proc.stdin",
        "proc.output",
        "proc.wait",
        "proc.signal",
        "commands.run",
        "files.read",
        "files.list",
        "files.stat",
        "files.mkdir",
        "files.rename",
        "files.remove",
        "logs",
        "ports.forward",
        "ports.close",
        "sandbox.snapshot",
        "sandbox.pause",
        "sandbox.restore",
        "sandbox.set_ttl",
        "sandbox.destroy",
    } <= set(ops)
    (decl,) = ir.sandboxes
    assert decl.secret_env == {} and decl.env == {"MODE": "dev"}
    assert [i.path for i in decl.includes] == ["src/lib.py"]
    assert decl.mounts == [str((tmp_path / "src").resolve())]
    start = next(o for o in ir.operations if o.op == "commands.start")
    assert start.args["secret_env"] == {"API_KEY": "api-key"}
    # blobs: the included file and the written file are stored by hash, not inline
    blob = next(o for o in ir.operations if o.op == "files.write").args["data"]
    assert (
        IRm.blob_path(tmp_path / "rec", blob["sha256"]).read_bytes() == b"print('hello from mvm')"
    )
    assert b"hello from mvm" not in path.read_bytes()


def test_replaying_a_recording_into_a_recorder_gives_the_same_operations(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "a")
    script_like(rec, tmp_path)
    rec.save()
    again = Recorder(tmp_path / "b")
    ir = IRm.load(tmp_path / "a")
    Replayer(tmp_path / "a", again, io.BytesIO(), io.BytesIO()).run(ir)
    want = [(o.op, o.sandbox, o.args) for o in ir.operations]
    # logs are never followed in a replay: the script, not the IR, knew when to stop
    want = [(op, sb, {**a, "follow": False} if op == "logs" else a) for op, sb, a in want]
    assert want == [(o.op, o.sandbox, o.args) for o in again.ir.operations]
    assert msgspec.to_builtins(ir.sandboxes[0].includes) == msgspec.to_builtins(
        again.ir.sandboxes[0].includes
    )


def test_replay_refuses_a_tampered_blob(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "a")
    with make(rec, tmp_path) as sb:
        sb.files.write("/work/x", b"original")
    rec.save()
    blob = next(o for o in rec.ir.operations if o.op == "files.write").args["data"]
    IRm.blob_path(tmp_path / "a", blob["sha256"]).write_bytes(b"evil!!!!")
    with pytest.raises(InvalidArgument, match="does not match"):
        Replayer(tmp_path / "a", Recorder(tmp_path / "b"), io.BytesIO(), io.BytesIO()).run(
            IRm.load(tmp_path / "a")
        )


def test_unknown_images_fail_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound) as ei:
        make(Recorder(tmp_path), tmp_path, image="python-3.12")
    assert "python-3.11" in str(ei.value) and "python-3.13" in str(ei.value)
    assert "python-3.11" in ei.value.data["known"]


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_decode_fails_cleanly_on_garbage(data: bytes) -> None:
    """Bytes that are not a JSON object are refused, with InvalidArgument and nothing else."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    assume(not isinstance(doc, dict))  # a JSON object may be a (minimal) valid IR
    with pytest.raises(InvalidArgument, match="not a valid mvm IR"):
        IRm.decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200)
@given(
    st.dictionaries(st.sampled_from(["format", "version", "sandboxes", "operations"]), json_values)
)
def test_decode_fails_cleanly_on_wrong_shapes(doc: dict[str, Any]) -> None:
    """Either the document is a valid IR (then it decodes to exactly what it says) or it
    is refused with InvalidArgument: no other exception, no silently altered IR."""
    try:
        ir = IRm.decode(json.dumps(doc).encode())
    except InvalidArgument:

        def same(key: str, want: Any) -> bool:  # True == 1 in Python, not in JSON's types
            got = doc.get(key, want)
            return type(got) is type(want) and got == want

        minimal = (
            same("format", IRm.FORMAT)
            and same("version", IRm.VERSION)
            and same("sandboxes", [])
            and same("operations", [])
        )
        assert not minimal, f"a valid document was refused: {doc!r}"
        return
    assert (ir.format, ir.version) == (IRm.FORMAT, IRm.VERSION)
    assert len(ir.sandboxes) == len(doc.get("sandboxes", []))
    assert len(ir.operations) == len(doc.get("operations", []))


def test_decode_refuses_each_wrong_field() -> None:
    assert IRm.decode(b"{}").format == IRm.FORMAT  # the minimal valid IR
    for doc in (
        {"format": "other"},
        {"version": 2},
        {"operations": [{"op": "no.such.op"}]},
        {"sandboxes": 1},
        {"unknown": 1},
    ):
        with pytest.raises(InvalidArgument):
            IRm.decode(json.dumps(doc).encode())


def test_decode_refuses_unknown_ops_and_escaping_includes(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    make(rec, tmp_path)
    doc = msgspec.to_builtins(rec.ir)
    bad_op = json.loads(json.dumps(doc))
    bad_op["operations"][0]["op"] = "host.shell"
    with pytest.raises(InvalidArgument, match="unknown op"):
        IRm.decode(json.dumps(bad_op).encode())
    bad_inc = json.loads(json.dumps(doc))
    bad_inc["sandboxes"][0]["includes"] = [
        {"path": "../../etc/passwd", "sha256": "0" * 64, "size": 1, "mode": 420}
    ]
    with pytest.raises(InvalidArgument, match="bad include path"):
        IRm.decode(json.dumps(bad_inc).encode())
    assert not VALIDATOR.is_valid(bad_inc)


def test_plan_admission_denies_what_the_policy_forbids(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    with make(rec, tmp_path, resources=mvm.resources(cpu_cores=4)) as sb:
        sb.commands.run(["true"], env={"K": mvm.secret("other")})
        sb.ports.forward(guest_port=80, host="0.0.0.0", allow_wildcard=True)
    policy = admission.Policy(max_cpus=2, allowed_secrets=("api-*",))
    (view,) = planmod.decide(rec.ir, policy, ["python-3.11"])
    assert not view.decision.allowed
    assert {d.rule for d in view.decision.denials} == {"cpus", "secrets", "ports.wildcard"}
    (ok,) = planmod.decide(
        rec.ir, admission.Policy(max_cpus=4, allow_wildcard_ports=True), ["python-3.11"]
    )
    assert ok.decision.allowed, ok.decision.denials


# ------------------------------------------------------------------------------- the CLI


def mvmctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.py").write_text("x = 1\n")
    for image in ("python-3.12", "python-3.11"):
        (tmp_path / f"{image}.py").write_text(COOKBOOK.replace("IMAGE", image))
    return tmp_path


def test_plan_prints_the_plan_and_admission(project: Path) -> None:
    r = mvmctl("run", "--mode", "plan", str(project / "python-3.11.py"))
    assert r.returncode == 0, r.stderr
    for want in (
        "image      python-3.11",
        "writable layer 1024 MiB",
        "network    none",
        "secrets    api-key",
        "/work/src/lib.py",
        "admission  allow",
        "commands.start",
    ):
        assert want in r.stdout, r.stdout


def test_plan_of_an_unknown_image_fails_naming_the_known_ones(project: Path) -> None:
    r = mvmctl("run", "--mode", "plan", str(project / "python-3.12.py"))
    assert r.returncode == ImageNotFound.exit_code
    assert "unknown image 'python-3.12'" in r.stderr and "python-3.13" in r.stderr
    assert "Traceback" not in r.stderr


def test_plan_exits_nonzero_when_admission_denies(project: Path) -> None:
    pol = project / "policy.toml"
    pol.write_text('allowed_secrets = ["db-*"]\n')
    r = mvmctl(
        "run", "--mode", "plan", str(project / "python-3.11.py"), env={"MVM_POLICY": str(pol)}
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "admission  DENY" in r.stdout and "[secrets]" in r.stdout


def test_compile_writes_ir_and_files_by_hash(project: Path) -> None:
    out = project / "ir"
    r = mvmctl("compile", str(project / "python-3.11.py"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "ir.json").read_text())
    VALIDATOR.validate(doc)
    (inc,) = doc["sandboxes"][0]["includes"]
    assert (out / "files" / inc["sha256"]).read_text() == "x = 1\n"
    assert [o["op"] for o in doc["operations"]] == [
        "sandbox.create",
        "files.write",
        "commands.start",
        "sandbox.stop",
    ]


def test_run_mode_takes_exactly_one_target(project: Path) -> None:
    r = mvmctl("run", "--mode", "plan", "a.py", "b.py")
    assert r.returncode == 2 and "one SCRIPT" in r.stderr


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(IRm.OPS),
            st.dictionaries(
                st.sampled_from(
                    [
                        "path",
                        "data",
                        "argv",
                        "proc",
                        "id",
                        "ref",
                        "name",
                        "timeout",
                        "stdin",
                        "guest_port",
                        "mode",
                        "stream",
                        "signal",
                        "src",
                        "dest",
                        "snapshot",
                    ]
                ),
                json_values,
                max_size=5,
            ),
        ),
        max_size=6,
    )
)
def test_replay_of_hostile_operations_fails_only_cleanly(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, dict[str, Any]]]
) -> None:
    """Whatever an IR's operations say, replay raises an MvmError or nothing (here into a
    Recorder, which validates like the live backend's inputs)."""
    d = tmp_path_factory.mktemp("hostile")
    rec = Recorder(d / "seed")
    make(rec, d)
    doc = msgspec.to_builtins(rec.ir)
    doc["operations"] = [doc["operations"][0]] + [
        {"seq": i + 1, "op": op, "sandbox": "sb0", "args": args} for i, (op, args) in enumerate(ops)
    ]
    out = Recorder(d / "out")
    try:
        ir = IRm.decode(json.dumps(doc).encode())
        Replayer(d, out, io.BytesIO(), io.BytesIO()).run(ir)
    except MvmError:
        return
    # accepted: every operation was performed, in order (the Recorder keeps no info reads)
    assert [o.op for o in out.ir.operations] == [
        o.op for o in ir.operations if o.op != "sandbox.info"
    ]


def test_plan_json_is_one_document_even_when_the_script_prints(project: Path) -> None:
    script = project / "noisy.py"
    script.write_text((project / "python-3.11.py").read_text() + "\nprint('script output')\n")
    r = mvmctl("run", "--mode", "plan", "--json", str(script))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["decisions"] == [{"sandbox": "sb0", "allowed": True, "denials": [], "notes": []}]
    assert doc["ir"]["sandboxes"][0]["secret_env"] == {}
    assert "script output" in r.stderr
