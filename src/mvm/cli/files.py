"""``mvmctl fs ...`` and ``mvmctl cp``: files in a sandbox, through mvmd."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import click

from mvm.api import models as M
from mvm.cli.common import OctalMode, connect, emit_json, fail_on_errors
from mvm.errors import InvalidArgument

if TYPE_CHECKING:
    from mvm.client import Client


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
    from mvm.cli.ui import safe_text

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


def _is_guest_dir(c: Client, name: str, path: str) -> bool:
    from mvm.errors import AgentError

    try:
        return c.stat(name, path).type == "dir"
    except AgentError:
        return False
