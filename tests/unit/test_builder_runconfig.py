"""An image's recorded Cmd/User/WorkingDir: how a Dockerfile lays its own over the base's
(in the builder) and how the service applies them to commands with fields left unset."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mvm.api import models as M
from mvm.builder import dockerfile as dockerfiles
from mvm.builder import inguest
from mvm.builder.build import explicit_config
from mvm.errors import InvalidArgument
from mvm.service.imagedefaults import Defaults, ImageDefaults, from_build


def test_dockerfile_sets_only_what_it_names() -> None:
    df = dockerfiles.parse("FROM base.tar\nENV A=1\nRUN true\n")
    assert explicit_config(df) == {"env": {"A": "1"}}
    df = dockerfiles.parse('FROM x\nUSER app\nWORKDIR /srv\nCMD ["sh", "-c", "echo hi"]\n')
    assert explicit_config(df) == {
        "env": {},
        "user": "app",
        "workdir": "/srv",
        "cmd": ["sh", "-c", "echo hi"],
    }
    df = dockerfiles.parse('FROM x\nENTRYPOINT ["/bin/tool"]\n')
    assert explicit_config(df) == {"env": {}, "entrypoint": ["/bin/tool"], "cmd": []}


def test_run_config_lays_the_dockerfile_over_the_base(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1001:1001::/h:/bin/sh\n")
    base = {"env": {"PATH": "/bin", "A": "1"}, "user": "1001", "workdir": "/w", "cmd": ["a"]}
    got = inguest.run_config(base, {"env": {"A": "2"}, "cmd": ["b"]}, str(tmp_path))
    assert got == {"env": {"PATH": "/bin", "A": "2"}, "user": "app", "workdir": "/w", "cmd": ["b"]}
    assert inguest.run_config({}, {"env": {}, "user": "app:app"}, str(tmp_path))["user"] == "app"
    assert inguest.run_config({"user": ""}, {"env": {}}, str(tmp_path))["user"] == ""
    with pytest.raises(
        inguest.oci.OciError,  # type: ignore[attr-defined]
        match=r"'4242'.*passwd",
    ):
        inguest.run_config({"user": "4242"}, {}, str(tmp_path))


def test_defaults_from_the_record_are_bounded() -> None:
    cfg = {"cmd": ["cat", "/m"], "entrypoint": ["env"], "user": "app", "workdir": "/srv"}
    assert from_build({"config": cfg}) == Defaults(("env", "cat", "/m"), "app", "/srv")
    bad = {"cmd": "sh", "user": "a b", "workdir": "rel", "entrypoint": [1, ""]}
    assert from_build({"config": bad}) == Defaults()
    assert from_build({}) == Defaults()
    assert from_build({"config": {"user": "", "workdir": ""}}) == Defaults()


class _Core:
    def __init__(self, build: dict[str, Any]) -> None:
        self.build = build
        self.reads = 0

    def image_for(self, rec: Any) -> Any:
        self.reads += 1
        return SimpleNamespace(build=self.build)


def _live() -> Any:
    return SimpleNamespace(rec=SimpleNamespace(image_id="i1", image="img"))


def test_unset_fields_follow_the_image_and_explicit_ones_win() -> None:
    core = _Core({"config": {"cmd": ["echo", "hi"], "user": "app", "workdir": "/srv"}})
    d = ImageDefaults(core)  # type: ignore[arg-type]
    got = d.apply(_live(), M.ExecRequest(argv=[]))
    assert (got.argv, got.user, got.cwd) == (["echo", "hi"], "app", "/srv")
    got = d.apply(_live(), M.ExecRequest(argv=["id"], user="root", cwd="/"))
    assert (got.argv, got.user, got.cwd) == (["id"], "root", "/")
    proc = d.apply(_live(), M.ProcStart(argv=["id"]))
    assert (proc.argv, proc.user, proc.cwd) == (["id"], "app", "/srv")
    assert core.reads == 1  # one read per image id


def test_no_command_and_no_cmd_is_a_clear_error() -> None:
    d = ImageDefaults(_Core({}))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no CMD"):
        d.apply(_live(), M.ExecRequest(argv=[]))
    got = d.apply(_live(), M.ExecRequest(argv=["true"]))
    assert (got.user, got.cwd) == (None, None)  # a preset image: mvm's defaults


def test_bare_run_of_an_image_without_cmd_is_refused_before_boot() -> None:
    import asyncio

    from mvm.oneshot import run_once

    class Store:
        def ensure(self, name: str, reporter: Any = None) -> Any:
            return SimpleNamespace(build={})

    with pytest.raises(InvalidArgument, match="records no CMD") as info:
        asyncio.run(run_once([], image="python", store=Store()))  # type: ignore[arg-type]
    assert info.value.exit_code == 2


def test_an_old_runtime_is_cleared_without_following_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / ".mvm/rt/bin").mkdir(parents=True)
    (root / ".mvm/rt/bin/python3").write_text("old")
    inguest.clear_runtime(str(root))
    assert not (root / ".mvm/rt").exists() and (root / ".mvm").is_dir()
    (outside / "rt").mkdir(parents=True)
    (root / ".mvm").rmdir()
    (root / ".mvm").symlink_to(outside)
    inguest.clear_runtime(str(root))
    assert not (root / ".mvm").exists() and (outside / "rt").is_dir()
