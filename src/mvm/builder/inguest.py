"""The build, as run *inside the builder VM* as root (standard library only).

``python3 -I inguest.py SPEC.json``: formats the scratch disk, makes the new root there
(an OCI import, mmdebstrap of a Debian suite, or a copy of a built mvm image), runs the
build steps in a chroot of it, clamps timestamps, writes a reproducible ext4 to the output
disk and prints one JSON line: ``{"bytes": N, "config": {...}, "packages": [...]}`` or
``{"error": "..."}``. Disks are found by their virtio serial, never by probe order.

Steps run in a chroot, not a nested VM: the builder VM *is* the boundary (a throwaway
guest whose only products are the output disk's bytes, checked from outside), and a
nested boot under TCG would cost minutes per build.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tarfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oci  # type: ignore[import-not-found]

SCRATCH = "/mnt/scratch"
GUEST_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = SCRATCH + "/root"


def disk(serial: str) -> str:
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                if f.read().strip() == serial:
                    return f"/dev/{name}"
        except OSError:
            continue
    raise oci.OciError(f"the builder has no disk with serial {serial}")


def sh(argv: list[str], **kw: Any) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise oci.OciError(f"{argv[0]} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")


def mkfs(
    dev: str, spec: dict[str, Any], tree: str | None = None, blocks: int | None = None
) -> None:
    argv = ["mkfs.ext4", "-q", "-F", "-L", "mvmroot", "-m", "0", "-O", "^has_journal"]
    argv += ["-U", spec["uuid"], "-E", f"hash_seed={spec['hash_seed']},root_owner=0:0"]
    if tree is not None:
        argv += ["-d", tree]
    argv.append(dev)
    if blocks is not None:
        argv.append(f"{blocks}k")
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(spec["epoch"])}
    sh(argv, env=env)


def clamp(root: str, epoch: int) -> int:
    """Every mtime/atime later than ``epoch`` becomes ``epoch``; returns the entry count."""
    count = 1
    os.utime(root, (epoch, epoch), follow_symlinks=False)
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            count += 1
            os.utime(p, (epoch, min(int(st.st_mtime), epoch)), follow_symlinks=False)
    return count


def fix_inode_times(dev: str, inodes: int, epoch: int) -> None:
    """mke2fs 1.47.0 copies ctimes from the tree: set every inode's times to ``epoch``."""
    cmds = [
        f"sif <{i}> {field}{suffix} {value}"
        for i in range(1, inodes + 1)
        for field in ("ctime", "crtime", "atime")
        for suffix, value in (("", f"@{epoch}"), ("_extra", "0"))
    ]
    path = SCRATCH + "/debugfs.cmds"
    with open(path, "w") as f:
        f.write("\n".join(cmds) + "\n")
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch)}
    sh(["debugfs", "-w", "-f", path, dev], env=env)


def lookup_user(root: str, user: str) -> tuple[int, int]:
    name, _, group = user.partition(":")
    uid = gid = -1
    if name in ("root", "0"):
        uid = gid = 0
    if name.isdigit():
        uid, gid = int(name), int(name)
    try:
        with open(os.path.join(root, "etc/passwd")) as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > 3 and (parts[0] == name or parts[2] == name):
                    uid, gid = int(parts[2]), int(parts[3])
                    break
    except OSError:
        pass
    if uid < 0:
        raise oci.OciError(f"user {name!r} does not exist in the image")
    if group.isdigit():
        gid = int(group)
    return uid, gid


def run_step(argv: list[str], env: dict[str, str], workdir: str, user: str, line: int) -> None:
    uid, gid = lookup_user(ROOT, user)
    for sub in ("proc", "dev"):
        os.makedirs(os.path.join(ROOT, sub), exist_ok=True)
    sh(["mount", "-t", "proc", "proc", ROOT + "/proc"])
    sh(["mount", "--bind", "/dev", ROOT + "/dev"])
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.chroot(ROOT)
                os.makedirs(workdir, exist_ok=True)
                os.chdir(workdir)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:
                print(f"cannot run {argv[0]!r}: {exc}", file=sys.stderr)
            os._exit(127)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    finally:
        subprocess.run(["umount", "-l", ROOT + "/proc"], check=False)
        subprocess.run(["umount", "-l", ROOT + "/dev"], check=False)
    if code != 0:
        where = f"line {line}" if line else "build step"
        raise oci.OciError(f"{where}: {' '.join(argv)[:200]!r} exited with {code}")


def copy_step(context: str, sources: list[str], dest: str, workdir: str, chown: str | None) -> None:
    dest_abs = dest if dest.startswith("/") else os.path.join(workdir, dest)
    uid, gid = lookup_user(ROOT, chown) if chown else (0, 0)
    unpacker = oci.Unpacker(ROOT)
    with tarfile.open(context, "r:") as tar:
        members = tar.getmembers()
        for src in sources:
            src = os.path.normpath(src)
            hits = [m for m in members if src in (".", m.name) or m.name.startswith(src + "/")]
            if not hits:
                raise oci.OciError(f"COPY {src}: no such file in the build context")
            for m in hits:
                if m.name == src and (not dest.endswith("/") and len(sources) == 1):
                    target = dest_abs
                elif m.name == src:
                    target = os.path.join(dest_abs, os.path.basename(src))
                else:
                    rel = m.name if src == "." else m.name[len(src) + 1 :]
                    target = os.path.join(dest_abs, rel)
                m2 = copy.copy(m)  # TarInfo.replace is newer than the builder's Python
                m2.name, m2.uid, m2.gid = target.lstrip("/"), uid, gid
                unpacker._member(tar, m2)


def debootstrap(spec: dict[str, Any]) -> None:
    src = spec["source"]
    hooks = [
        'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user',
        'mkdir -p "$1/work" && chown 1000:1000 "$1/work"',
    ]
    argv = ["mmdebstrap", "--variant=minbase", "--format=directory"]
    argv += [f"--include={','.join(src['packages'])}", '--aptopt=Acquire::Retries "3"']
    if src.get("pins"):
        # The lock's versions as apt preferences (priority 1001) for the same request: the
        # packages apt picks as dependencies stay marked automatic, as in the unlocked
        # build, so equal versions give equal bytes. Removed before the root is packed; a
        # version the mirror lacks is not installed, and the host refuses the result.
        prefs = GUEST_DIR + "/lock.pref"
        with open(prefs, "w") as f:
            for pin in src["pins"]:
                name, _, version = pin.partition("=")
                f.write(f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n\n")
        pref_dir = '"$1/etc/apt/preferences.d"'
        argv.append(f"--setup-hook=mkdir -p {pref_dir} && cp {prefs} {pref_dir}/mvm-lock.pref")
        hooks.append(f"rm -f {pref_dir}/mvm-lock.pref")
    argv += [f"--customize-hook={h}" for h in hooks]
    argv += [src["suite"], ROOT, "-"]
    env = {**os.environ, **spec.get("proxy_env", {}), "SOURCE_DATE_EPOCH": str(spec["epoch"])}
    os.rmdir(ROOT)
    sh(argv, input=src["sources"], env=env, timeout=7200)
    if src.get("pins"):
        check_pins(src["pins"], installed(ROOT))


def installed(root: str) -> list[str]:
    """``name=version`` of every package dpkg has in ``root``."""
    if not os.path.exists(root + "/var/lib/dpkg/status"):
        return []
    r = subprocess.run(
        ["chroot", root, "dpkg-query", "-W", "-f=${Package}=${Version}\\n"],
        capture_output=True,
        text=True,
    )
    return sorted(r.stdout.split())


def check_pins(pins: list[str], got: list[str]) -> None:
    """A pinned version apt could not find was replaced by another: name the pins."""
    have = dict(p.split("=", 1) for p in got)
    lost = [p for p in pins if p.split("=", 1)[0] in have and p not in got]
    if lost:
        raise oci.OciError(
            "--locked: the mirror no longer serves "
            + ", ".join(f"{p} (got {have[p.split('=', 1)[0]]})" for p in lost[:10])
        )


RT = "/.mvm/rt"
SKIP_STDLIB = {
    "test",
    "idlelib",
    "tkinter",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
}


def has_python(root: str) -> bool:
    return any(os.path.exists(root + p) for p in ("/usr/bin/python3", "/usr/local/bin/python3"))


def clear_runtime(root: str) -> None:
    """Remove ``/.mvm/rt`` from the new root, never following a link the image planted."""
    for path in (root + "/.mvm", root + RT):
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
    if os.path.isdir(root + RT):
        shutil.rmtree(root + RT)


def bundle_runtime(root: str) -> None:
    """An image without Python gets the builder's own (interpreter, stdlib, loader, libs)
    under /.mvm/rt: /init starts the agent through that loader, never the image's."""
    rt = root + RT
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    os.makedirs(rt + "/bin")
    os.makedirs(rt + "/lib")
    shutil.copy2(os.path.realpath(sys.executable), rt + "/bin/python3")
    shutil.copytree(
        f"/usr/lib/{ver}",
        f"{rt}/lib/{ver}",
        symlinks=True,
        ignore=lambda d, n: [x for x in n if x in SKIP_STDLIB],
    )
    dynload = f"/usr/lib/{ver}/lib-dynload"
    objs = [sys.executable] + [
        os.path.join(dynload, n) for n in os.listdir(dynload) if n.endswith(".so")
    ]
    r = subprocess.run(["ldd", *objs], capture_output=True, text=True)
    libs = {
        w[2]
        for w in (line.split() for line in r.stdout.splitlines())
        if len(w) > 2 and w[1] == "=>" and w[2].startswith("/")
    }
    for lib in [*sorted(libs), "/lib64/ld-linux-x86-64.so.2"]:
        shutil.copy2(os.path.realpath(lib), os.path.join(rt + "/lib", os.path.basename(lib)))


def ensure_guest_user(root: str) -> None:
    """The agent runs commands as ``user`` (uid 1000) in /work: add both when absent."""
    os.makedirs(root + "/etc", exist_ok=True)
    for path, line in (
        ("/etc/passwd", "user:x:1000:1000::/work:/bin/sh\n"),
        ("/etc/group", "user:x:1000:\n"),
    ):
        existing = ""
        if os.path.lexists(root + path):
            if os.path.islink(root + path):
                continue  # not written through a link
            with open(root + path) as f:
                existing = f.read()
        if path == "/etc/passwd" and not any(x.startswith("root:") for x in existing.splitlines()):
            existing += "root:x:0:0:root:/root:/bin/sh\n"
        if path == "/etc/group" and not any(x.startswith("root:") for x in existing.splitlines()):
            existing += "root:x:0:\n"
        if not any(x.split(":")[0] == "user" for x in existing.splitlines()):
            with open(root + path, "w") as f:
                f.write(existing + ("" if not existing or existing.endswith("\n") else "\n") + line)
    if not os.path.lexists(root + "/work"):
        os.makedirs(root + "/work")
        os.chown(root + "/work", 1000, 1000)


def user_name(root: str, user: str) -> str:
    """``USER`` as the name the agent runs commands as: a uid or ``name:group`` becomes
    the passwd name (the agent takes names); one the image lacks fails the build."""
    name = user.partition(":")[0]
    try:
        with open(os.path.join(root, "etc/passwd")) as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > 3 and name in (parts[0], parts[2]):
                    return parts[0]
    except OSError:
        pass
    raise oci.OciError(f"user {name!r} (the image's USER) is not in its /etc/passwd")


def run_config(base: dict[str, Any], explicit: dict[str, Any], root: str) -> dict[str, Any]:
    """The image's run defaults: the base's (OCI config or base image), then what the
    Dockerfile set itself (``explicit`` holds only those keys; ``env`` is merged)."""
    config = {**base, **{k: v for k, v in explicit.items() if k != "env"}}
    config["env"] = {**base.get("env", {}), **explicit.get("env", {})}
    if config.get("user"):
        config["user"] = user_name(root, config["user"])
    return config


def flush_inputs() -> None:
    """The host filled the read-only disks after this VM booted (a warm builder): drop what
    the kernel cached of them at boot (partition probe) before anything reads them."""
    for serial in ("mvminput", "mvmcontext"):
        try:
            sh(["blockdev", "--flushbufs", disk(serial)])
        except oci.OciError:
            continue


def build(spec: dict[str, Any]) -> dict[str, Any]:
    flush_inputs()
    scratch = disk("mvmscratch")
    out = disk("mvmoutput")
    mkfs(scratch, spec, blocks=spec["scratch_bytes"] >> 10)
    os.makedirs(SCRATCH, exist_ok=True)
    sh(["mount", "-o", "noatime", scratch, SCRATCH])
    os.makedirs(ROOT, mode=0o755)
    config: dict[str, Any] = {}
    source = spec["source"]["kind"]
    if source == "oci":
        with open(disk("mvminput"), "rb") as f:
            config = oci.import_archive(f, ROOT, spec["max_bytes"]).to_json()
        ensure_guest_user(ROOT)
    elif source == "debian":
        debootstrap(spec)
    elif source == "image":
        config = dict(spec["source"].get("config") or {})  # the base image's run defaults
        os.makedirs("/mnt/base", exist_ok=True)
        sh(["mount", "-o", "ro,noload", disk("mvminput"), "/mnt/base"])
        sh(["cp", "-a", "/mnt/base/.", ROOT])
        sh(["umount", "/mnt/base"])
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update(config.get("env", {}))
    workdir, user = config.get("workdir") or "/", config.get("user") or "root"
    context = disk("mvmcontext") if spec.get("context") else ""
    for step in spec["steps"]:
        kind, args = step["kind"], step["args"]
        if kind == "env":
            env[args[0]] = args[1]
        elif kind == "workdir":
            workdir = args[0]
            os.makedirs(ROOT + workdir, exist_ok=True)
        elif kind == "user":
            user = args[0]
        elif kind == "copy":
            copy_step(context, args[:-1], args[-1], workdir, step.get("chown"))
        elif kind == "run":
            run_env = {**env, **spec.get("proxy_env", {})}
            run_step(args, run_env, workdir, user, step.get("line", 0))
    if not has_python(ROOT):
        clear_runtime(ROOT)  # a base image built here has one: the builder's own replaces it
        bundle_runtime(ROOT)
    packages = installed(ROOT)
    entries = clamp(ROOT, spec["epoch"])
    used = 0
    for dirpath, _dirs, files in os.walk(ROOT):
        for n in files:
            used += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    size = (int(used * 1.3) + (64 << 20) + 4 * 4096 * entries) // (1 << 20) << 20
    if size > spec["output_bytes"]:
        raise oci.OciError(f"the image needs {size >> 20} MiB, more than the output disk")
    mkfs(out, spec, tree=ROOT, blocks=size >> 10)
    fix_inode_times(out, entries + 11, spec["epoch"])
    os.sync()
    config = run_config(config, spec.get("config", {}), ROOT)
    return {"bytes": size, "config": config, "packages": packages[:20000], "user_env": env}


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        result = build(spec)
    except (oci.OciError, OSError, subprocess.SubprocessError) as exc:
        print(json.dumps({"error": str(exc)[-4000:]}))
        return 3
    except Exception as exc:  # a bug here must still end in one JSON line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[-4000:]}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
