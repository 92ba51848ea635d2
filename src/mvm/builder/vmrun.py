"""Run one build inside a builder VM and take its output disk back, checked from outside.

The host's part is small on purpose: make sparse disks, boot a VM of the ``builder``
image with them attached (input read-only, scratch and output read-write), run the
in-guest driver as root, then *only* look at the output file's size and ext4 superblock
magic and hash it. Nothing the builder produced is mounted, unpacked or parsed here,
except one bounded JSON line that is validated field by field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mvm.daemon.egress import policy_for, proxy_env, serve_egress
from mvm.errors import ImageBuildError
from mvm.images.rootfs import sha256_file
from mvm.images.store import Image, ImageStore
from mvm.policy.network import Policy as NetPolicy
from mvm.progress import NullReporter, Reporter
from mvm.vm import MicroVM, VMSpec, new_id

BUILDER_IMAGE = "builder"
GUEST_DIR = "/run/mvm-build"
EXT4_MAGIC_OFFSET = 1080
MAX_RESULT = 4 << 20
#: The one build-time timeout (seconds); ``MVM_BUILD_TIMEOUT``. Builds under TCG are slow.
BUILD_TIMEOUT = float(os.environ.get("MVM_BUILD_TIMEOUT", "7200"))


@dataclass
class Job:
    """What to build: ``source`` is {"kind": "oci"|"debian"|"image", ...}."""

    source: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    input_disk: Path | None = None  # the OCI archive, or a base image's rootfs
    context_tar: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)  # recorded defaults (cmd, user...)
    epoch: int = 0
    max_bytes: int = 8 << 30
    network_preset: str = "none"
    network_allow: list[str] = field(default_factory=list)


@dataclass
class Output:
    rootfs: Path  # in the store, named by content hash, read-only
    sha256: str
    bytes: int
    config: dict[str, Any]
    packages: list[str]
    builder_vm: str
    seconds: float
    #: The builder VM's cold boot: what a warm (already running) builder would save.
    boot_seconds: float = 0.0


def fixed_ids(seed: str) -> tuple[str, str]:
    """A UUID and an htree hash seed derived from the inputs: equal inputs, equal bytes."""
    import hashlib
    import uuid

    h = hashlib.sha256(seed.encode()).digest()
    return str(uuid.UUID(bytes=h[:16], version=4)), str(uuid.UUID(bytes=h[16:32], version=4))


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _ro_disk(src: Path, work: Path, name: str) -> Path:
    """A read-only disk of ``src``: the file itself when sector-aligned, else a padded copy."""
    if src.stat().st_size % 512 == 0:
        return src
    dst = work / name
    shutil.copyfile(src, dst)
    with dst.open("ab") as f:
        f.write(b"\0" * (512 - dst.stat().st_size % 512))
    return dst


def check_result(raw: bytes, output_size: int) -> dict[str, Any]:
    """The driver's JSON line, validated: the guest is hostile."""
    lines = raw.strip().splitlines()
    if not lines or len(raw) > MAX_RESULT:
        raise ImageBuildError("the builder gave no result")
    try:
        doc = json.loads(lines[-1])
    except ValueError:
        raise ImageBuildError("the builder's result is not JSON") from None
    if not isinstance(doc, dict):
        raise ImageBuildError("the builder's result is not an object")
    if "error" in doc:
        raise ImageBuildError(f"build failed in the builder VM: {str(doc['error'])[:4000]}")
    n = doc.get("bytes")
    if not isinstance(n, int) or not (1 << 20) <= n <= output_size or n % 4096:
        raise ImageBuildError(f"the builder reported an impossible image size {n!r}")
    cfg = doc.get("config", {})
    pkgs = doc.get("packages", [])
    if not isinstance(cfg, dict) or not isinstance(pkgs, list):
        raise ImageBuildError("the builder's result has bad fields")
    return {
        "bytes": n,
        "config": clean_config(cfg),
        "packages": [str(p)[:200] for p in pkgs[:20000]],
    }


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: A user the builder resolved in the image's /etc/passwd (a name, as the agent takes).
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")


def clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The image's run defaults as reported by the builder, reduced to known, bounded fields."""

    def text(v: Any, limit: int = 4096) -> str:
        return v[:limit] if isinstance(v, str) else ""

    def words(v: Any) -> list[str]:
        return [text(x) for x in v[:256] if isinstance(x, str)] if isinstance(v, list) else []

    env = cfg.get("env")
    return {
        "env": {
            k: text(v)
            for k, v in list(env.items())[:256]
            if isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str)
        }
        if isinstance(env, dict)
        else {},
        # Empty: the image names none, and mvm's defaults (``user`` in /work) apply.
        "workdir": wd if (wd := text(cfg.get("workdir"), 1024)).startswith("/") else "",
        "user": user if _USER.match(user := text(cfg.get("user"), 64)) else "",
        "cmd": words(cfg.get("cmd")),
        "entrypoint": words(cfg.get("entrypoint")),
    }


def check_ext4(path: Path) -> None:
    with path.open("rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        if f.read(2) != b"\x53\xef":
            raise ImageBuildError("the builder's output is not an ext4 file system")


async def run_job(job: Job, store: ImageStore, reporter: Reporter | None = None) -> Output:
    """Build ``job`` in a fresh builder VM; the result lands in the store or nowhere."""
    rep = reporter or NullReporter()
    builder = store.ensure(BUILDER_IMAGE, rep)  # the one image built on the host
    netpolicy = await policy_for(job.network_preset, list(job.network_allow))
    store.rootfs_dir.mkdir(parents=True, exist_ok=True)
    with store.lock():  # one build at a time per MVM_HOME, as for host builds
        store._clean_staging()  # what a killed build process left (no VM uses it now)
        return await _run_locked(job, store, rep, builder, netpolicy)


async def _run_locked(
    job: Job, store: ImageStore, rep: Reporter, builder: Image, netpolicy: NetPolicy
) -> Output:
    vm_id = new_id()
    work = store.rootfs_dir / f".tmp-build-{vm_id}"  # removed by the store after a crash
    work.mkdir()
    started = time.monotonic()
    try:
        in_size = job.input_disk.stat().st_size if job.input_disk else 0
        scratch_size = max(1 << 30, 4 * in_size + (1 << 30))
        out_size = min(job.max_bytes + (1 << 30), max(1 << 30, 3 * in_size + (1 << 30)))
        disks: list[tuple[Path, bool, str]] = [
            (_sparse(work / "scratch.img", scratch_size), False, "mvmscratch"),
            (_sparse(work / "output.img", out_size), False, "mvmoutput"),
        ]
        if job.input_disk is not None:
            disks.append((_ro_disk(job.input_disk, work, "input.img"), True, "mvminput"))
        if job.context_tar is not None:
            disks.append((_ro_disk(job.context_tar, work, "context.img"), True, "mvmcontext"))
        # Pins are left out: a --locked build of the same inputs must make the same bytes.
        unpinned = {k: v for k, v in job.source.items() if k != "pins"}
        seed = json.dumps([unpinned, job.steps, job.config], sort_keys=True)
        uuid, hash_seed = fixed_ids(seed)
        spec = {
            "source": job.source,
            "steps": job.steps,
            "context": job.context_tar is not None,
            "config": job.config,
            "epoch": job.epoch,
            "uuid": uuid,
            "hash_seed": hash_seed,
            "max_bytes": job.max_bytes,
            "output_bytes": out_size,
            "proxy_env": proxy_env() if netpolicy.enabled else {},
        }
        vmspec = VMSpec(
            builder, cpus=1, memory_mb=1024, network=netpolicy.enabled, disks=tuple(disks)
        )
        rep.stage("booting the builder VM")
        async with (
            serve_egress(vm_id, netpolicy),
            await MicroVM.boot(vmspec, store=store, vm_id=vm_id, fast=False) as vm,
        ):
            boot_seconds = vm.boot_seconds
            agent = vm.require_agent()
            await agent.mkdir(GUEST_DIR, parents=True)
            pkg = resources.files("mvm.builder")
            for name in ("oci.py", "inguest.py"):
                await agent.write_file(f"{GUEST_DIR}/{name}", pkg.joinpath(name).read_bytes())
            await agent.write_file(f"{GUEST_DIR}/spec.json", json.dumps(spec).encode())
            rep.stage("building in the builder VM")
            r = await agent.exec(
                ["python3", "-I", f"{GUEST_DIR}/inguest.py", f"{GUEST_DIR}/spec.json"],
                user="root",
                timeout=BUILD_TIMEOUT,
                output_limit=MAX_RESULT,
            )
        if r.timed_out:
            raise ImageBuildError(f"the build ran past {BUILD_TIMEOUT:g}s")
        if not r.stdout.strip():
            raise ImageBuildError(
                f"the builder gave no result: {r.stderr[-2000:].decode(errors='replace')}"
            )
        result = check_result(r.stdout, out_size)
        out = work / "output.img"
        os.truncate(out, result["bytes"])
        check_ext4(out)
        digest = sha256_file(out)
        final = store.rootfs_dir / f"{digest}.ext4"
        os.chmod(out, 0o444)
        os.replace(out, final)  # atomic: a killed build never leaves a half image here
        rep.finish(f"rootfs {result['bytes'] >> 20} MiB ({digest[:12]})")
        return Output(
            final,
            digest,
            result["bytes"],
            result["config"],
            result["packages"],
            vm_id,
            time.monotonic() - started,
            boot_seconds,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
