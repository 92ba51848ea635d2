"""Builds that run in the builder VM: OCI/docker archives, Dockerfiles, ``[build]`` steps.

Each entry point turns its inputs into a ``vmrun.Job``, runs it, registers the image,
writes the lock file (when there is a project directory) and one ``image.built`` audit
record linking the input hashes, the builder VM (whose egress decisions are audited under
its id) and the image id.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from mvm import audit, names
from mvm.builder import dockerfile as dockerfiles
from mvm.builder import lock as locks
from mvm.builder import steps as stepmod
from mvm.builder.vmrun import Job, Output, run_job
from mvm.errors import ImageBuildError, MvmError
from mvm.images import apt_sources
from mvm.images import manifest as manifests
from mvm.images.manifest import Manifest
from mvm.images.store import Image, ImageStore
from mvm.progress import Reporter

#: Docker names mapped to Debian suites and the packages that make them (no registry).
DEBIAN_BASES = {
    "debian:bookworm": ("bookworm", ()),
    "debian:12": ("bookworm", ()),
    "debian:bookworm-slim": ("bookworm", ()),
    "debian:trixie": ("trixie", ()),
    "debian:13": ("trixie", ()),
    "python:3.11": ("bookworm", ("python3", "python3-pip", "python3-venv", "python-is-python3")),
    "python:3.11-slim": (
        "bookworm",
        ("python3", "python3-pip", "python3-venv", "python-is-python3"),
    ),
    "python:3.13-slim": ("trixie", ("python3", "python3-pip", "python3-venv", "python-is-python3")),
}


def epoch() -> int:
    """SOURCE_DATE_EPOCH when set, else 1: every timestamp in the image is clamped to it.
    Never 0: e2fsprogs reads ``E2FSPROGS_FAKE_TIME=0`` as "not set" and stamps the clock."""
    try:
        return max(1, int(os.environ.get("SOURCE_DATE_EPOCH", "1")))
    except ValueError:
        return 1


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _debian_source(suite: str, packages: list[str], pins: list[str] | None) -> dict[str, Any]:
    source: dict[str, Any] = {
        "kind": "debian",
        "suite": suite,
        "packages": sorted(set(manifests.BASE_PACKAGES) | set(packages)),
        "sources": apt_sources.sources_for_suite(suite),
    }
    if pins:  # apt preferences in the builder: same request, the lock's versions
        source["pins"] = sorted(pins)
    return source


def _finish(
    out: Output,
    m: Manifest,
    inputs: dict[str, str],
    store: ImageStore,
    project: Path | None,
    config: dict[str, Any],
) -> Image:
    build = {"inputs": inputs, "config": config, "packages": len(out.packages)}
    img = store.register(m, out.rootfs, out.sha256, build)
    if project is not None:
        locks.write(
            project,
            locks.Lock(locks.VERSION, m.name, inputs, out.packages, out.sha256, img.id),
        )
    try:
        audit.record(
            "image.built",
            actor="builder",
            image=img.name,
            image_id=img.id,
            rootfs_sha256=out.sha256,
            rootfs_bytes=out.bytes,
            inputs=inputs,
            builder_vm=out.builder_vm,  # egress decisions of the build carry this sandbox name
            builder_id=out.builder_id,
            seconds=round(out.seconds, 3),
            builder_boot_seconds=round(out.boot_seconds, 3),
        )
    except MvmError:
        pass
    return img


def _run(job: Job, store: ImageStore, reporter: Reporter | None) -> Output:
    return asyncio.run(run_job(job, store, reporter))


def import_oci(
    archive: Path, name: str, *, store: ImageStore | None = None, reporter: Reporter | None = None
) -> Image:
    """``mvmctl build --oci ARCHIVE --name N``: layers are unpacked only in the builder."""
    names.check("image", name)
    store = store or ImageStore()
    if not archive.is_file():
        raise ImageBuildError(
            f"{archive} is not a file", hint="pass an OCI layout or docker save archive (tar)"
        )
    inputs = {"archive": sha256_path(archive)}
    job = Job({"kind": "oci", "archive": inputs["archive"]}, input_disk=archive, epoch=epoch())
    out = _run(job, store, reporter)
    env = {str(k): str(v) for k, v in dict(out.config.get("env", {})).items()}
    m = Manifest(name=name, description=f"imported OCI archive {inputs['archive'][:12]}", env=env)
    return _finish(out, m, inputs, store, None, out.config)


def _context(project: Path, sources: list[str], origin: str, work: Path) -> Path | None:
    if not sources:
        return None
    files = stepmod.collect(project, sources, origin)
    tar = work / "context.tar"
    stepmod.write_context_tar(files, epoch(), tar)
    return tar


def build_dockerfile(
    dockerfile: Path,
    project: Path,
    name: str,
    *,
    locked: bool = False,
    store: ImageStore | None = None,
    reporter: Reporter | None = None,
    network_allow: list[str] | None = None,
) -> Image:
    """``mvmctl build -f Dockerfile DIR``: FROM a Debian suite, a built image or an archive."""
    names.check("image", name)
    store = store or ImageStore()
    text = dockerfile.read_text()
    df = dockerfiles.parse(text)
    lock = locks.read(project) if locked else None
    input_disk: Path | None = None
    inputs = {"dockerfile": hashlib.sha256(text.encode()).hexdigest()}
    if df.base in DEBIAN_BASES:
        suite, pkgs = DEBIAN_BASES[df.base]
        source = _debian_source(suite, list(pkgs), lock.pins() if lock else None)
    elif store.find(df.base) is not None:
        base = store.resolve(df.base)
        base_config = {**dict(base.build.get("config") or {}), "env": base.env}
        source = {"kind": "image", "id": base.id, "config": base_config}
        input_disk = Path(base.rootfs)
        inputs["base_image"] = base.id
    elif (project / df.base).is_file():
        input_disk = project / df.base
        inputs["archive"] = sha256_path(input_disk)
        source = {"kind": "oci", "archive": inputs["archive"]}
    else:
        raise dockerfiles.DockerfileError(
            f"line {df.base_line}: FROM {df.base}: not a Debian base this host can build, "
            "a built mvm image, or an archive in the build directory",
            hint=f"Debian bases: {', '.join(DEBIAN_BASES)}; no registry is reachable",
            line=df.base_line,
        )
    copies = [s for st in df.steps if st.kind == "copy" for s in st.args[:-1]]
    steps = [_step_json(s) for s in df.steps]
    config = explicit_config(df)
    with tempfile.TemporaryDirectory(prefix="mvm-ctx-") as tmp:
        ctx = _context(project, copies, str(dockerfile), Path(tmp))
        if ctx is not None:
            inputs["context"] = sha256_path(ctx)
        if lock is not None:
            locks.check_inputs(lock, inputs, _wanted(source))
        job = Job(
            source,
            steps,
            input_disk=input_disk,
            context_tar=ctx,
            config=config,
            epoch=epoch(),
            network_preset="registries",
            network_allow=stepmod.check_allow(network_allow or [], "--allow"),
        )
        out = _locked_run(job, store, reporter, lock)
    env = dict(out.config["env"])  # the base's, then the Dockerfile's ENV
    m = Manifest(name=name, description=f"built from {dockerfile.name}", env=env)
    return _finish(out, m, inputs, store, project, out.config)


def explicit_config(df: dockerfiles.Dockerfile) -> dict[str, Any]:
    """The run defaults the Dockerfile itself sets; the builder lays them over the base's
    (an OCI config or a built image's record). As in Docker, ENTRYPOINT resets CMD."""
    config: dict[str, Any] = {"env": dict(df.env)}
    kinds = {s.kind for s in df.steps}
    if "workdir" in kinds:
        config["workdir"] = df.workdir
    if "user" in kinds:
        config["user"] = df.user
    if df.entrypoint:
        config["entrypoint"], config["cmd"] = list(df.entrypoint), list(df.cmd)
    elif df.cmd:
        config["cmd"] = list(df.cmd)
    return config


def build_project(
    project: Path,
    *,
    locked: bool = False,
    store: ImageStore | None = None,
    reporter: Reporter | None = None,
    network_allow: list[str] | None = None,
) -> Image | None:
    """A project whose ``mvm.toml`` has a ``[build]`` table; None when it has none.
    Its steps reach the ``registries`` preset plus ``[build] allow`` and ``network_allow``."""
    f = project / "mvm.toml"
    text = f.read_text()
    sec = stepmod.parse_section(text, str(f))
    if sec is None:
        return None
    store = store or ImageStore()
    m = manifests.parse(text, str(f))
    lock = locks.read(project) if locked else None
    source = _debian_source(m.suite, list(m.packages), lock.pins() if lock else None)
    inputs = {"manifest": hashlib.sha256(text.encode()).hexdigest()}
    steps = [_step_json(s) for s in stepmod.steps_from_section(sec)]
    with tempfile.TemporaryDirectory(prefix="mvm-ctx-") as tmp:
        ctx = _context(project, list(sec.files), str(f), Path(tmp))
        if ctx is not None:
            inputs["context"] = sha256_path(ctx)
        if lock is not None:
            locks.check_inputs(lock, inputs, _wanted(source))
        job = Job(
            source,
            steps,
            context_tar=ctx,
            epoch=epoch(),
            network_preset="registries",
            network_allow=[*sec.allow, *stepmod.check_allow(network_allow or [], "--allow")],
        )
        out = _locked_run(job, store, reporter, lock)
    return _finish(out, m, inputs, store, project, {"env": dict(sec.env)})


def _wanted(source: dict[str, Any]) -> list[str]:
    """The package names a Debian source asks for (none for an archive or a built image)."""
    if source["kind"] != "debian":
        return []
    return list(source["packages"])


def _locked_run(
    job: Job, store: ImageStore, reporter: Reporter | None, lock: locks.Lock | None
) -> Output:
    before = set(store.rootfs_dir.glob("*.ext4")) if store.rootfs_dir.is_dir() else set()
    try:
        out = _run(job, store, reporter)
    except ImageBuildError as exc:
        if lock is not None and "mmdebstrap" in exc.message:
            raise ImageBuildError(
                f"--locked: the mirror no longer serves a version pinned in {locks.LOCK_NAME}: "
                f"{exc.message[-1500:]}",
                hint=f"build without --locked to re-resolve and rewrite {locks.LOCK_NAME}",
            ) from None
        raise
    if lock is not None:
        try:
            locks.check_result(lock, out.packages, out.sha256)
        except MvmError:
            if out.rootfs not in before:  # this build made it, and no record names it
                out.rootfs.unlink(missing_ok=True)
            raise
    return out


def _step_json(s: dockerfiles.Step) -> dict[str, Any]:
    return {"kind": s.kind, "line": s.line, "args": list(s.args), "chown": s.chown}
