"""Run one build inside a builder VM and take its output disk back, checked from outside.

The host's part is small on purpose: claim a builder sandbox (``builder.session``: a warm
one or one booted now, with its fixed sparse disks), copy the input and context into its
still-unread read-only disks, run the in-guest driver as root, then *only* look at the
output disk's first bytes: size, ext4 superblock magic, hash. The builder is downed after
the build (one build per builder). Nothing the builder produced is mounted, unpacked or parsed here,
except one bounded JSON line that is validated field by field.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mvm.api import models as M
from mvm.builder.session import open_session
from mvm.daemon.egress import proxy_env
from mvm.errors import ImageBuildError, MvmError
from mvm.images.rootfs import sha256_file
from mvm.images.store import ImageStore
from mvm.progress import NullReporter, Reporter
from mvm.vm import new_id

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
    #: Seconds this build spent booting its builder (0: a warm builder was waiting).
    boot_seconds: float = 0.0
    builder_id: str = ""


def fixed_ids(seed: str) -> tuple[str, str]:
    """A UUID and an htree hash seed derived from the inputs: equal inputs, equal bytes."""
    import hashlib
    import uuid

    h = hashlib.sha256(seed.encode()).digest()
    return str(uuid.UUID(bytes=h[:16], version=4)), str(uuid.UUID(bytes=h[16:32], version=4))


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
    """Build ``job`` in a builder sandbox; the result lands in the store or nowhere."""
    rep = reporter or NullReporter()
    store.ensure(BUILDER_IMAGE, rep)  # the one image built on the host
    store.rootfs_dir.mkdir(parents=True, exist_ok=True)
    with store.lock():  # one build at a time per MVM_HOME, as for host builds
        store._clean_staging()  # what a killed build process left (no VM uses it now)
        return await _run_locked(job, store, rep)


def _fill(disk: Path, src: Path) -> None:
    """Copy ``src`` into the start of a builder's (fixed-size, still unread) disk file."""
    size = src.stat().st_size
    if size > disk.stat().st_size:
        raise ImageBuildError(
            f"{src.name} is {size >> 20} MiB, more than the builder's "
            f"{disk.stat().st_size >> 20} MiB input disk"
        )
    with src.open("rb") as fin, disk.open("r+b") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _take_output(disk: Path, dst: Path, size: int) -> None:
    """The first ``size`` bytes of the builder's output disk, kept sparse."""
    zero = bytes(1 << 20)
    with disk.open("rb") as fin, dst.open("wb") as fout:
        left = size
        while left > 0:
            chunk = fin.read(min(left, 1 << 20))
            if not chunk:
                raise ImageBuildError("the builder's output disk is shorter than reported")
            if chunk == zero[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            left -= len(chunk)
        fout.truncate(size)


def _allow(job: Job) -> list[str]:
    return sorted(set(job.network_allow))


async def _run_locked(job: Job, store: ImageStore, rep: Reporter) -> Output:
    work = store.rootfs_dir / f".tmp-build-{new_id()}"  # removed by the store after a crash
    work.mkdir()
    started = time.monotonic()
    try:
        in_size = job.input_disk.stat().st_size if job.input_disk else 0
        scratch_size = max(1 << 30, 4 * in_size + (1 << 30))
        out_size = min(job.max_bytes + (1 << 30), max(1 << 30, 3 * in_size + (1 << 30)))
        # Pins are left out: a --locked build of the same inputs must make the same bytes.
        unpinned = {k: v for k, v in job.source.items() if k != "pins"}
        seed = json.dumps([unpinned, job.steps, job.config], sort_keys=True)
        uuid, hash_seed = fixed_ids(seed)
        network = job.network_preset != "none"
        spec = {
            "source": job.source,
            "steps": job.steps,
            "context": job.context_tar is not None,
            "config": job.config,
            "epoch": job.epoch,
            "uuid": uuid,
            "hash_seed": hash_seed,
            "max_bytes": job.max_bytes,
            "scratch_bytes": scratch_size,
            "output_bytes": out_size,
            "proxy_env": proxy_env() if network else {},
        }
        async with open_session() as session:
            rep.stage("claiming a builder VM")
            got = await session.claim(_allow(job))
            try:
                rdir = Path(got.run_dir)
                if job.input_disk is not None:
                    _fill(rdir / "input.img", job.input_disk)
                if job.context_tar is not None:
                    _fill(rdir / "context.img", job.context_tar)
                rep.stage(f"building in builder {got.name}")
                r = await session.run(got.name, _driver(spec))
                if r.timed_out:
                    raise ImageBuildError(f"the build ran past {BUILD_TIMEOUT:g}s")
                if not r.stdout.strip():
                    raise ImageBuildError(
                        f"the builder gave no result: {r.stderr[-2000:].decode(errors='replace')}"
                    )
                result = check_result(r.stdout, out_size)
                out = work / "output.img"
                _take_output(rdir / "output.img", out, result["bytes"])
            finally:
                with contextlib.suppress(MvmError):
                    await session.release(got.name)
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
            got.name,
            time.monotonic() - started,
            got.boot_seconds,
            builder_id=got.id,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


_BOOTSTRAP = (
    "import json,os,sys\n"
    "d=json.load(sys.stdin)\n"
    "os.makedirs(d['dir'],exist_ok=True)\n"
    "for k,v in d['files'].items():\n"
    "    open(os.path.join(d['dir'],k),'w').write(v)\n"
    "os.execv(sys.executable,[sys.executable,'-I',d['dir']+'/inguest.py',d['dir']+'/spec.json'])\n"
)


def _driver(spec: dict[str, Any]) -> M.ExecRequest:
    """One exec as root: the driver's files come on stdin (standard library only)."""
    pkg = resources.files("mvm.builder")
    files = {n: pkg.joinpath(n).read_text() for n in ("oci.py", "inguest.py")}
    files["spec.json"] = json.dumps(spec)
    return M.ExecRequest(
        argv=["python3", "-I", "-c", _BOOTSTRAP],
        user="root",
        cwd="/",
        stdin=json.dumps({"dir": GUEST_DIR, "files": files}).encode(),
        timeout=BUILD_TIMEOUT,
        output_limit=MAX_RESULT,
    )
