"""One sandbox shape: the SDK's spec, the IR's declaration and the API's bodies are
``api.models.SandboxShape``, so a field, a default or a rule exists once, and the IR v1
wire format stays what ``schemas/ir-v1.json`` says."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import mvm
from mvm.api import models as M
from mvm.errors import InvalidArgument
from mvm.policy import admission
from mvm.sdk import ir as IRm
from mvm.sdk import plan as planmod
from mvm.sdk.backend import SandboxSpec
from mvm.sdk.record import Recorder
from mvm.sdk.replay import Replayer
from mvm.sdk.sandbox import Sandbox
from tests.unit.test_sdk_options import spec

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = Draft202012Validator(json.loads((ROOT / "schemas" / "ir-v1.json").read_text()))


def test_every_sandbox_struct_is_the_shape() -> None:
    for cls in (SandboxSpec, IRm.SandboxDecl, M.CreateSandbox):
        assert issubclass(cls, M.SandboxShape), cls
    # the defaults are the shape's: nothing restates them
    assert M.SandboxShape().image == M.DEFAULT_IMAGE
    assert (mvm.Resources().cpu_cores, mvm.Resources().memory_mb) == (
        M.SandboxShape().cpus,
        M.SandboxShape().memory_mb,
    )
    assert spec().ttl_seconds == M.SandboxShape().ttl_seconds


def test_a_recorded_shape_comes_back_whole_through_the_ir(tmp_path: Path) -> None:
    """SDK spec -> IR declaration -> ir.json -> replay's spec -> mvmd's create body:
    every shape field arrives as the script said it."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("print(1)\n")
    want = spec(
        name="shape-one",
        workload_id="agent-tool",
        ttl="1h",
        include=["src"],
        tags={"team": "x"},
        resources=mvm.resources(cpu_cores=2, memory_mb=1024, rootfs_size_mb=2048),
        network=mvm.network(mode="allow", allow=["pypi.org:443"]),
        env={"MODE": "dev", "KEY": mvm.secret("api-key")},
        base=tmp_path,
    )
    rec = Recorder(tmp_path / "rec")
    Sandbox._create(want, backend=rec)
    rec.save()
    doc = json.loads((tmp_path / "rec" / "ir.json").read_text())
    VALIDATOR.validate(doc)
    assert not {"ports", "kind"} & set(doc["sandboxes"][0])  # not in IR v1
    ir = IRm.load(tmp_path / "rec")
    (decl,) = ir.sandboxes
    assert M.shape_fields(decl) == M.shape_fields(want)
    got: list[SandboxSpec] = []

    class Catch(Recorder):
        def create(self, spec: SandboxSpec) -> M.SandboxInfo:
            got.append(spec)
            return super().create(spec)

    Replayer(tmp_path / "rec", Catch(tmp_path / "again"), io.BytesIO(), io.BytesIO()).run(ir)
    assert M.shape_fields(got[0]) == M.shape_fields(want)
    assert [i.rel for i in got[0].includes] == ["src/a.py"] and got[0].name == "shape-one"
    body = M.extend(M.CreateSandbox, got[0], name=got[0].name)
    assert M.shape_fields(body) == M.shape_fields(want)


def test_plan_mode_admits_the_shape_as_mvmd_does(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "rec")
    sb = Sandbox._create(spec(env={"K": mvm.secret("api-key")}), backend=rec)
    sb.ports.forward(guest_port=80, host_port=8080)
    sb.commands.run(["true"], env={"T": mvm.secret("token")})
    (decl,) = rec.ir.sandboxes
    plan = planmod.plan_for(decl, rec.ir)
    base = admission.plan_from_shape(decl, decl.mounts)
    assert (plan.image, plan.cpus, plan.memory_mb, plan.ttl_seconds) == (
        base.image,
        base.cpus,
        base.memory_mb,
        base.ttl_seconds,
    )
    assert plan.secrets == ("api-key", "token")
    assert plan.ports == (("127.0.0.1", 8080, 80, False),)


def _doc(tmp_path: Path) -> dict[str, Any]:
    rec = Recorder(tmp_path)
    Sandbox._create(spec(), backend=rec)
    doc: dict[str, Any] = json.loads(IRm.encode(rec.ir))
    return doc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ports", [{"guest_port": 80}]),
        ("kind", "browser"),
        ("tags", {f"t{i}": "v" for i in range(M.MAX_TAGS + 1)}),
        ("ttl_seconds", M.MAX_TTL + 1),
        ("cpus", M.MAX_CPUS + 1),
        ("memory_mb", 1),
    ],
)
def test_decode_refuses_a_declaration_the_shape_or_v1_refuses(
    tmp_path: Path, field: str, value: object
) -> None:
    doc = _doc(tmp_path)
    doc["sandboxes"][0][field] = value
    with pytest.raises(InvalidArgument, match="sb0"):
        IRm.decode(json.dumps(doc).encode())


def test_v1_cannot_record_what_it_cannot_say(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    s = msgspec.structs.replace(spec(), ports=[M.PortSpec(guest_port=80)])
    with pytest.raises(InvalidArgument, match="IR v1 has no 'ports'"):
        rec.create(s)


shape_values = st.fixed_dictionaries(
    {
        "cpus": st.integers(-2, M.MAX_CPUS + 2),
        "memory_mb": st.integers(0, M.MAX_MEMORY_MB + 2),
        "disk_mb": st.none() | st.integers(0, M.MAX_DISK_MB + 2),
        "ttl_seconds": st.floats(-1, M.MAX_TTL * 1.01, allow_nan=False),
        "ntags": st.integers(0, M.MAX_TAGS + 2),
        "value_len": st.integers(0, M.MAX_LABEL + 2),
    }
)


@settings(max_examples=150, deadline=None)
@given(shape_values)
def test_the_sdk_refuses_exactly_what_mvmd_refuses(v: dict[str, Any]) -> None:
    """The same values through the SDK (``resources``, ``build_spec``) and through mvmd's
    check of a create body: both accept or both refuse (the SDK's own extra rules, label
    names and duration syntax, are kept out of the drawn values)."""
    tags = {f"t{i}": "v" * v["value_len"] for i in range(v["ntags"])}
    shape = dict(v, tags=tags)
    del shape["ntags"], shape["value_len"]
    try:
        M.check_shape(M.CreateSandbox(**shape))
        mvmd_ok = True
    except InvalidArgument:
        mvmd_ok = False
    try:
        spec(
            resources=mvm.resources(
                cpu_cores=v["cpus"], memory_mb=v["memory_mb"], rootfs_size_mb=v["disk_mb"]
            ),
            ttl=v["ttl_seconds"],
            tags=tags,
        )
        sdk_ok = True
    except InvalidArgument:
        sdk_ok = False
    assert sdk_ok == mvmd_ok, shape


def _ts_consts() -> dict[str, int]:
    text = "".join((ROOT / "sdk-ts" / "src" / f).read_text() for f in ("options.ts", "sandbox.ts"))
    return {
        m[1]: math.prod(int(x) for x in m[2].split("*"))
        for m in re.finditer(r"^export const (M[AI][XN]_\w+) = ([0-9 *]+);", text, re.M)
    }


def test_the_typescript_twin_has_the_same_shape_and_bounds() -> None:
    """The TS SDK cannot import the shape: its copy of the fields and bounds is pinned here."""
    ts = _ts_consts()
    assert (ts["MAX_CPUS"], ts["MIN_MEMORY_MB"], ts["MAX_MEMORY_MB"]) == (
        M.MAX_CPUS,
        M.MIN_MEMORY_MB,
        M.MAX_MEMORY_MB,
    )
    assert (ts["MIN_ROOTFS_MB"], ts["MAX_ROOTFS_MB"]) == (M.MIN_DISK_MB, M.MAX_DISK_MB)
    assert (ts["MAX_TTL"], ts["MAX_TAGS"], ts["MAX_TAG_VALUE"]) == (
        M.MAX_TTL,
        M.MAX_TAGS,
        M.MAX_LABEL,
    )
    models_ts = (ROOT / "sdk-ts" / "src" / "models.ts").read_text()
    body = re.search(r"export interface SandboxShape \{(.*?)\n\}", models_ts, re.S)
    assert body is not None
    camel = re.findall(r"^\s+(\w+):", body[1], re.M)
    snake = {re.sub(r"([A-Z])", lambda c: "_" + c[1].lower(), f) for f in camel}
    assert snake == set(M.SandboxShape.__struct_fields__) - set(IRm.NOT_IN_V1)
