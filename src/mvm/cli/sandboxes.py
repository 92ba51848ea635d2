"""Named-sandbox commands of mvmctl: init, up, ls, exec, fs, cp, proc, logs, wait, set-ttl,
pause, resume, snapshot, down, daemon. They talk to mvmd (started on demand)."""

from __future__ import annotations

import json
import math
import re
import signal as signals
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

import click
import msgspec
from rich.table import Table

from mvm import client as mvmclient
from mvm.api import models as M
from mvm.cli.common import OctalMode, check_name, fail_on_errors, network_options, split_env
from mvm.cli.ports import describe as describe_forward
from mvm.cli.ports import port_specs
from mvm.cli.ui import RichReporter, err_console, out_console, safe_text, stderr_is_tty
from mvm.durations import parse_duration
from mvm.errors import InvalidArgument
from mvm.images import manifest as manifests
from mvm.images.store import ImageStore
from mvm.project import PRESETS, init_project, uploads

EXEC_TIMEOUT_EXIT = 124


def emit_json(obj: Any) -> None:
    click.echo(msgspec.json.encode(obj).decode())


def connect() -> mvmclient.Client:
    return mvmclient.Client()


def ago(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- init / up


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="python", show_default=True)
@fail_on_errors
def init(directory: Path, preset: str) -> None:
    """Write a project (mvm.toml + example files) into DIRECTORY."""
    for p in init_project(directory, preset):
        click.echo(f"wrote {p}")
    click.echo(f"next: mvmctl build {directory} && mvmctl up {directory}")


@click.command()
@click.argument(
    "directory", required=False, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option("--name", help="Sandbox name (default: the project's image name, or a generated id).")
@click.option(
    "--image",
    help="Image to boot when no DIRECTORY is given.",
    default=None,
    callback=check_name("image"),
)
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--memory", default=512, show_default=True, type=click.IntRange(128, 16384), help="MiB."
)
@click.option(
    "--disk",
    type=click.IntRange(16, 65536),
    help="Writable layer in MiB (default: half the memory).",
)
@click.option(
    "--ttl", default="30m", show_default=True, help="Lifetime: 90s, 30m, 1h... then it is removed."
)
@click.option(
    "-e",
    "--env",
    "env",
    multiple=True,
    help="KEY=VALUE or KEY=secret:NAME for every command (repeatable).",
)
@click.option(
    "-p",
    "--port",
    "ports",
    multiple=True,
    metavar="HOST_PORT:GUEST_PORT",
    help="Forward 127.0.0.1:HOST_PORT to GUEST_PORT (repeatable; GUEST_PORT alone: any free port).",
)
@network_options
@click.option(
    "-d", "--detach", is_flag=True, default=True, help="Return once it runs (the default)."
)
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def up(
    directory: Path | None,
    name: str | None,
    image: str | None,
    cpus: int,
    memory: int,
    disk: int | None,
    ttl: str,
    env: tuple[str, ...],
    ports: tuple[str, ...],
    network_preset: str,
    network_allow: tuple[str, ...],
    detach: bool,
    as_json: bool,
) -> None:
    """Start a named sandbox (from a project DIRECTORY, or an --image) and leave it running."""
    files = []
    envs, secret_envs = split_env(env)
    port_list = port_specs(ports)
    if directory is not None:
        m = manifests.load_dir(directory)
        files = uploads(directory)
        store = ImageStore()
        found = store.find(m.name)
        if found is None or found.manifest != m:
            with RichReporter(enabled=stderr_is_tty() and not as_json) as rep:
                store.build(m, reporter=rep)
        image = m.name
        name = name or m.name
    req = M.CreateSandbox(
        name=name,
        image=image or manifests.DEFAULT_IMAGE,
        cpus=cpus,
        memory_mb=memory,
        disk_mb=disk,
        ttl_seconds=parse_duration(ttl, "ttl"),
        env=envs,
        secret_env=secret_envs,
        ports=port_list,
        network=M.NetworkSpec(preset=network_preset, allow=list(network_allow)),
        uploads=[str(directory.resolve())] if directory is not None else [],
    )
    with connect() as c:
        info = c.create(req)
        for f in files:
            c.write_file(info.name, f.remote, f.local.read_bytes(), mode=f.mode)
    if as_json:
        emit_json(info)
    else:
        click.echo(
            f"{info.name}  {info.id}  {info.state}  image={info.image}  "
            f"ttl={info.ttl_left:.0f}s" + (f"  ({len(files)} files in /work)" if files else "")
        )
        for fw in info.forwards:
            click.echo(f"  forward {fw.id}  {describe_forward(fw)}")


@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def ls(as_json: bool) -> None:
    """List sandboxes: name, id, image, state, age, TTL left, cpus/memory."""
    with connect() as c:
        items = c.list_sandboxes()
    if as_json:
        emit_json(items)
        return
    table = Table(box=None, header_style="bold")
    cols: tuple[str, ...] = (
        "NAME", "ID", "IMAGE", "STATE", "AGE", "TTL LEFT", "CPUS", "MEMORY", "DISK", "NETWORK",
        "PORTS",
    )  # fmt: skip
    clustered = any(s.host for s in items)
    if clustered:
        cols = (*cols, "HOST")
    for col in cols:
        table.add_column(col)
    for s in items:
        state = s.state + (f" ({s.reason[:40]})" if s.reason else "")
        if s.unresponsive:
            state = f"{s.state}, unresponsive ({s.unresponsive[:40]})"
        table.add_row(
            s.name,
            s.id,
            s.image,
            state,
            ago(s.created),
            f"{s.ttl_left:.0f}s",
            str(s.cpus),
            f"{s.memory_mb}M",
            f"{s.disk_mb}M",
            s.network.preset + (f"+{len(s.network.allow)}" if s.network.allow else ""),
            ",".join(describe_forward(f) for f in s.forwards) or "-",
            *((s.host or "-",) if clustered else ()),
        )
    out_console().print(table)


# ----------------------------------------------------------------------------- exec


@click.command(name="exec")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("-i", "--interactive", is_flag=True, help="Send stdin (up to 1 MiB) to the command.")
@click.option(
    "-e", "--env", "env", multiple=True, help="KEY=VALUE or KEY=secret:NAME (repeatable)."
)
@click.option("--cwd", help="Working directory (default /work).")
@click.option("--user", help="Guest user (default 'user'; 'root' allowed).")
@click.option(
    "--timeout",
    default="300s",
    show_default=True,
    help="Kill the command after this long (exit 124).",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Keep what the command leaves running after it exits (killed by default).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@fail_on_errors
def exec_(
    name: str,
    command: tuple[str, ...],
    interactive: bool,
    env: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    timeout: str,
    detach: bool,
    as_json: bool,
) -> None:
    """Run COMMAND in sandbox NAME; streams output and exits with its status."""
    stdin = b""
    if interactive:
        stdin = sys.stdin.buffer.read((1 << 20) + 1)
        if len(stdin) > 1 << 20:
            raise InvalidArgument("stdin is larger than 1 MiB", hint="copy it in with `mvmctl cp`")
    plain_env, secret_env = split_env(env)
    req = M.ExecRequest(
        argv=list(command),
        env=plain_env,
        secret_env=secret_env,
        cwd=cwd,
        user=user,
        stdin=stdin,
        timeout=parse_duration(timeout, "timeout"),
        detach=detach,
    )

    def show(stream_name: str, data: bytes) -> None:
        stream = sys.stdout.buffer if stream_name == "stdout" else sys.stderr.buffer
        stream.write(data)
        stream.flush()

    with connect() as c:
        final = M.gather_exec(
            c.exec_stream(name, req), on_output=None if as_json else show, keep=as_json
        )
    out = {"stdout": final.stdout, "stderr": final.stderr}
    code = EXEC_TIMEOUT_EXIT if final.timed_out else (final.exit_code or 0)
    if as_json:
        emit_json(
            {
                "sandbox": name,
                "exit_code": code,
                "stdout": out["stdout"].decode(errors="replace"),
                "stderr": out["stderr"].decode(errors="replace"),
                "duration": final.duration,
                "timed_out": final.timed_out,
                "signal": final.signal,
                "truncated": {"stdout": final.truncated_stdout, "stderr": final.truncated_stderr},
                "audit_id": final.audit_id,
            }
        )
    elif final.timed_out:
        err_console.print(f"[bold red]mvm:[/] command timed out after {req.timeout:g}s")
    sys.exit(code)


# ----------------------------------------------------------------------------- files


@click.group()
def fs() -> None:
    """Files in a sandbox: write, read, ls, stat, mkdir, rm, mv."""


@fs.command(name="write")
@click.argument("name")
@click.argument("path")
@click.option(
    "--mode", default="644", show_default=True, type=OctalMode(), help="Octal permissions."
)
@fail_on_errors
def fs_write(name: str, path: str, mode: int) -> None:
    """Write stdin to PATH in sandbox NAME (up to 64 MiB)."""
    data = sys.stdin.buffer.read(M.MAX_FILE_WRITE + 1)
    check_size(len(data))
    with connect() as c:
        st = c.write_file(name, path, data, mode=mode)
    click.echo(f"{path}: {st.size} bytes")


def check_size(n: int) -> None:
    if n > M.MAX_FILE_WRITE:
        raise InvalidArgument(
            f"file larger than the limit of {M.MAX_FILE_WRITE >> 20} MiB",
            hint="split it, or build it into the image",
        )


@fs.command(name="read")
@click.argument("name")
@click.argument("path")
@fail_on_errors
def fs_read(name: str, path: str) -> None:
    """Print the file PATH of sandbox NAME to stdout (bytes as they are)."""
    with connect() as c:
        data = c.read_file(name, path)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@fs.command(name="ls")
@click.argument("name")
@click.argument("path", default="/work")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def fs_ls(name: str, path: str, as_json: bool) -> None:
    """List a directory."""
    with connect() as c:
        entries = c.list_dir(name, path)
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        shown = click.style(safe_text(e.name), bold=e.type == "dir")
        click.echo(f"{safe_text(e.type):<8} {e.mode:04o} {e.size:>10}  {shown}")


@fs.command(name="stat")
@click.argument("name")
@click.argument("path")
@fail_on_errors
def fs_stat(name: str, path: str) -> None:
    """Show type, size, mode, owner and mtime (JSON)."""
    with connect() as c:
        emit_json(c.stat(name, path))


@fs.command(name="mkdir")
@click.argument("name")
@click.argument("path")
@click.option("-p", "--parents", is_flag=True)
@fail_on_errors
def fs_mkdir(name: str, path: str, parents: bool) -> None:
    """Create a directory."""
    with connect() as c:
        c.mkdir(name, path, parents)


@fs.command(name="rm")
@click.argument("name")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True)
@fail_on_errors
def fs_rm(name: str, path: str, recursive: bool) -> None:
    """Remove a file (or, with -r, a directory tree)."""
    with connect() as c:
        c.remove(name, path, recursive)


@fs.command(name="mv")
@click.argument("name")
@click.argument("src")
@click.argument("dest")
@fail_on_errors
def fs_mv(name: str, src: str, dest: str) -> None:
    """Rename SRC to DEST inside the sandbox."""
    with connect() as c:
        c.move(name, src, dest)


def split_remote(spec: str) -> tuple[str, str] | None:
    """``NAME:/path`` -> (NAME, /path); a local path -> None."""
    if ":" in spec and not spec.startswith(("/", ".")):
        name, _, path = spec.partition(":")
        if name and path.startswith("/"):
            return name, path
        raise InvalidArgument(f"{spec!r}: expected NAME:/absolute/path")
    return None


def safe_basename(remote: str) -> str:
    """A guest path's last part, checked before it names a host file."""
    base = PurePosixPath(remote).name
    if base in ("", ".", "..") or "\x00" in base or "/" in base:
        raise InvalidArgument(f"cannot name a host file after {remote!r}")
    return base


@click.command()
@click.argument("src")
@click.argument("dest")
@fail_on_errors
def cp(src: str, dest: str) -> None:
    """Copy a file between the host and a sandbox: cp ./f NAME:/work/ or cp NAME:/work/f ."""
    s, d = split_remote(src), split_remote(dest)
    if (s is None) == (d is None):
        raise InvalidArgument(
            "exactly one side must be NAME:/path", hint="e.g. mvmctl cp ./in.json worker:/work/"
        )
    with connect() as c:
        if d is not None:  # host -> guest
            local = Path(src)
            if local.is_dir():
                raise InvalidArgument(
                    f"{src} is a directory; cp copies files",
                    hint="use `mvmctl up DIR` or a tar file",
                )
            if not local.is_file():
                raise InvalidArgument(f"{src}: no such file")
            check_size(local.stat().st_size)
            name, path = d
            if path.endswith("/") or _is_guest_dir(c, name, path):
                path = path.rstrip("/") + "/" + local.name
            st = c.write_file(name, path, local.read_bytes(), mode=local.stat().st_mode & 0o777)
            click.echo(f"{src} -> {name}:{path} ({st.size} bytes)")
        else:
            assert s is not None
            name, path = s
            data = c.read_file(name, path)
            target = Path(dest)
            if target.is_dir() or dest.endswith("/"):
                target = target / safe_basename(path)
            if not target.parent.is_dir():
                raise InvalidArgument(
                    f"{target.parent}: no such directory on the host",
                    hint=f"create it first: mkdir -p {target.parent}",
                )
            try:
                target.write_bytes(data)
            except OSError as exc:
                raise InvalidArgument(f"cannot write {target}: {exc.strerror}") from None
            click.echo(f"{name}:{path} -> {target} ({len(data)} bytes)")


def _is_guest_dir(c: mvmclient.Client, name: str, path: str) -> bool:
    from mvm.errors import AgentError

    try:
        return c.stat(name, path).type == "dir"
    except AgentError:
        return False


# ----------------------------------------------------------------------------- processes


@click.group()
def proc() -> None:
    """Background processes: start, ls, signal, stdin, wait, kill, output."""


@proc.command(name="start")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("-e", "--env", "env", multiple=True)
@click.option("--cwd")
@click.option("--user")
@click.option("--stdin-open", is_flag=True, help="Keep stdin open for `proc stdin`.")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def proc_start(
    name: str,
    command: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    stdin_open: bool,
    as_json: bool,
) -> None:
    """Start COMMAND in the background; prints its process id."""
    plain_env, secret_env = split_env(env)
    with connect() as c:
        p = c.proc_start(
            name,
            M.ProcStart(
                argv=list(command),
                env=plain_env,
                secret_env=secret_env,
                cwd=cwd,
                user=user,
                stdin_open=stdin_open,
            ),
        )
    if as_json:
        emit_json(p)
    else:
        click.echo(p.proc)


@proc.command(name="ls")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def proc_ls(name: str, as_json: bool) -> None:
    """List background processes."""
    with connect() as c:
        procs = c.proc_list(name)
    if as_json:
        emit_json(procs)
        return
    for p in procs:
        status = "running" if p.running else f"exited {p.exit_code}"
        click.echo(f"{p.proc:>4}  pid {p.pid:<6} {status:<12} {' '.join(p.argv)[:80]}")


def _proc_id(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,15}", value):
        raise InvalidArgument(f"process id must be a number, not {value[:40]!r}")
    return int(value)


@proc.command(name="signal")
@click.argument("name")
@click.argument("proc_id")
@click.argument("sig", default="TERM")
@fail_on_errors
def proc_signal(name: str, proc_id: str, sig: str) -> None:
    """Send a signal (TERM, INT, KILL, HUP, or a number) to a background process."""
    num = (
        int(sig)
        if re.fullmatch(r"[0-9]{1,2}", sig)
        else getattr(signals, "SIG" + sig.upper().removeprefix("SIG"), None)
    )
    if not isinstance(num, int) or not 1 <= num <= 64:
        raise InvalidArgument(f"unknown signal {sig[:40]!r}", hint="TERM, INT, KILL, HUP or 1-64")
    with connect() as c:
        c.proc_signal(name, _proc_id(proc_id), int(num))


@proc.command(name="kill")
@click.argument("name")
@click.argument("proc_id")
@fail_on_errors
def proc_kill(name: str, proc_id: str) -> None:
    """SIGKILL a background process (and its process group)."""
    with connect() as c:
        c.proc_signal(name, _proc_id(proc_id), int(signals.SIGKILL))


@proc.command(name="stdin")
@click.argument("name")
@click.argument("proc_id")
@click.option("--eof", is_flag=True, help="Close its stdin after sending.")
@fail_on_errors
def proc_stdin(name: str, proc_id: str, eof: bool) -> None:
    """Send mvmctl's stdin to a background process started with --stdin-open."""
    data = sys.stdin.buffer.read(M.MAX_BODY + 1)
    check_size(len(data))
    with connect() as c:
        c.proc_stdin(name, _proc_id(proc_id), data, eof)


@proc.command(name="wait")
@click.argument("name")
@click.argument("proc_id")
@click.option("--timeout", default="60s", show_default=True)
@fail_on_errors
def proc_wait(name: str, proc_id: str, timeout: str) -> None:
    """Wait for a background process to end; exits with its status (124 if still running)."""
    with connect() as c:
        p = c.proc_wait(name, _proc_id(proc_id), parse_duration(timeout, "timeout"))
    if p.running:
        err_console.print(f"mvm: process {p.proc} still running after {timeout}")
        sys.exit(EXEC_TIMEOUT_EXIT)
    sys.exit(p.exit_code or 0)


@proc.command(name="output")
@click.argument("name")
@click.argument("proc_id")
@click.option("--stderr", is_flag=True, help="Show stderr instead of stdout.")
@fail_on_errors
def proc_output(name: str, proc_id: str, stderr: bool) -> None:
    """Print what a background process wrote (the last 1 MiB per stream is kept)."""
    with connect() as c:
        data = c.proc_output(name, _proc_id(proc_id), "stderr" if stderr else "stdout")
    sys.stdout.buffer.write(data)


# ----------------------------------------------------------------------------- lifecycle


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True)
@click.option("--since", help="Only newer lines: a duration (10m) or a Unix time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@fail_on_errors
def logs(name: str, follow: bool, since: str | None, as_json: bool) -> None:
    """Console and background-process output of a sandbox."""
    since_ts = None
    if since is not None:
        try:
            since_ts = float(since)
        except ValueError:
            since_ts = time.time() - parse_duration(since, "--since")
        if not math.isfinite(since_ts) or since_ts < 0:
            raise InvalidArgument(f"invalid --since: {since[:40]!r}")
    with connect() as c:
        try:
            for ev in c.logs(name, follow=follow, since=since_ts):
                if as_json:
                    emit_json(ev)
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev.timestamp))
                    click.echo(f"{stamp} {ev.stream:<16} {ev.message}")
        except KeyboardInterrupt:
            pass


@click.command()
@click.argument("name")
@click.option("--timeout", default="1h", show_default=True)
@fail_on_errors
def wait(name: str, timeout: str) -> None:
    """Wait until the sandbox stops (TTL, down, or failure).

    Exits 0 when it stopped, 124 when --timeout passed first (like ``proc wait``)."""
    with connect() as c:
        s = c.wait(name, parse_duration(timeout, "timeout"))
    click.echo(f"{s.name}: {s.state}" + (f" ({s.reason})" if s.reason else ""))
    if s.state in ("running", "paused", "creating"):
        sys.exit(124)


@click.command(name="set-ttl")
@click.argument("name")
@click.argument("ttl")
@fail_on_errors
def set_ttl(name: str, ttl: str) -> None:
    """Give a sandbox TTL more time from now (e.g. 1h)."""
    with connect() as c:
        s = c.set_ttl(name, parse_duration(ttl, "ttl"))
    click.echo(f"{s.name}: {s.ttl_left:.0f}s left")


@click.command()
@click.argument("name")
@fail_on_errors
def pause(name: str) -> None:
    """Freeze a sandbox's vCPUs (it keeps its memory)."""
    with connect() as c:
        click.echo(f"{c.pause(name).name}: paused")


@click.command()
@click.argument("name")
@fail_on_errors
def resume(name: str) -> None:
    """Continue a paused sandbox."""
    with connect() as c:
        click.echo(f"{c.resume(name).name}: running")


@click.group()
def snapshot() -> None:
    """Save, list, restore and remove snapshots (memory, devices and the writable layer)."""


@snapshot.command(name="save")
@click.argument("name")
@click.argument("snap")
@fail_on_errors
def snapshot_save(name: str, snap: str) -> None:
    with connect() as c:
        s = c.snapshot_save(name, snap)
    click.echo(f"{s.sandbox}/{s.name}: {s.size >> 20} MiB")


@snapshot.command(name="ls")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def snapshot_ls(name: str, as_json: bool) -> None:
    with connect() as c:
        snaps = c.snapshot_list(name)
    if as_json:
        emit_json(snaps)
        return
    for s in snaps:
        click.echo(f"{s.name:<20} {s.size >> 20:>6} MiB  {ago(s.created)} ago  {s.image}")


@snapshot.command(name="restore")
@click.argument("name")
@click.argument("snap")
@click.option("--as", "as_name", default=None, help="Start it as a new sandbox of this name.")
@fail_on_errors
def snapshot_restore(name: str, snap: str, as_name: str | None) -> None:
    """Put NAME back to SNAP (recreating the sandbox if it was removed), or with --as NEW
    start SNAP as a new sandbox NEW and leave NAME alone."""
    with connect() as c:
        if as_name is not None:
            s = c.snapshot_restore_as(name, snap, as_name)
        else:
            s = c.snapshot_restore(name, snap)
    click.echo(f"{s.name}: restored {snap} ({s.state})")
    for w in s.warnings:
        err_console.print(f"[yellow]mvm:[/] {w}")


@snapshot.command(name="rm")
@click.argument("name")
@click.argument("snap")
@fail_on_errors
def snapshot_rm(name: str, snap: str) -> None:
    with connect() as c:
        c.snapshot_remove(name, snap)


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every sandbox.")
@fail_on_errors
def down(names: tuple[str, ...], all_: bool) -> None:
    """Stop and remove sandboxes (their snapshots are kept)."""
    if not names and not all_:
        raise InvalidArgument("name a sandbox, or pass --all")
    with connect() as c:
        targets = [s.name for s in c.list_sandboxes()] if all_ else list(names)
        for n in targets:
            c.down(n)
            click.echo(f"{n}: removed")


@click.group()
def daemon() -> None:
    """mvmd, the host daemon (normally started on demand by any command)."""


@daemon.command(name="start")
@fail_on_errors
def daemon_start() -> None:
    with connect() as c:
        c.ensure_daemon()
        st = c.status()
    click.echo(f"mvmd running (pid {st.pid}) on {st.socket}")


@daemon.command(name="stop")
@fail_on_errors
def daemon_stop() -> None:
    """Stop mvmd. Sandboxes keep running; the next mvmd reattaches to them."""
    c = mvmclient.Client(autostart=False)
    st = c.ping()
    if st is None:
        click.echo("mvmd is not running")
        return
    c.shutdown()
    deadline = time.monotonic() + 10
    while c.ping() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    click.echo(f"mvmd stopped (pid {st.pid})")


@daemon.command(name="status")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def daemon_status(as_json: bool) -> None:
    st = mvmclient.Client(autostart=False).ping()
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(st) if st else {"running": False}))
    elif st is None:
        click.echo("mvmd is not running")
    else:
        click.echo(f"mvmd {st.version} pid {st.pid}, {st.sandboxes} sandboxes, socket {st.socket}")
        if st.pool.get("size"):
            p = st.pool
            click.echo(
                f"pool: {p.get('idle', 0)} waiting VMs ({p.get('idle_mb', 0)} MiB) over "
                f"{p.get('shapes', 0)} shapes, {p.get('size')} per shape, "
                f"{p.get('handed_out', 0)} handed out"
            )
    sys.exit(0 if st else 1)


COMMANDS = [
    init,
    up,
    ls,
    exec_,
    fs,
    cp,
    proc,
    logs,
    wait,
    set_ttl,
    pause,
    resume,
    snapshot,
    down,
    daemon,
]
