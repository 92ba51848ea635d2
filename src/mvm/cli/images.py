"""``mvmctl doctor``, ``build`` and ``images``: the host's abilities and the image store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import msgspec

from mvm.cli.common import fail_on_errors
from mvm.errors import InvalidArgument
from mvm.images import manifest as manifests
from mvm.images.store import Image, ImageStore


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_on_errors
def doctor(as_json: bool) -> None:
    """Show what this host can do: QEMU, KVM or TCG, tools, kernel, images, disk."""
    from rich.markup import escape
    from rich.table import Table

    from mvm import doctor as doctor_mod
    from mvm.cli.ui import out_console

    checks = doctor_mod.run_checks()
    failed = any(c.status == doctor_mod.FAIL for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [c.__dict__ for c in checks]}))
    else:
        table = Table(show_header=True, header_style="bold")
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col)
        colors = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            table.add_row(
                c.name, f"[{colors[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix)
            )
        out_console().print(table)
    sys.exit(1 if failed else 0)


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", help=f"Build a preset ({', '.join(manifests.preset_names())}).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if a cached image matches.")
@click.option("--json", "as_json", is_flag=True, help="Print the image record as JSON.")
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Build a Dockerfile (the common subset) in the builder VM; DIRECTORY is the context.",
)
@click.option(
    "--oci",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Import an OCI image layout or docker save archive (tar) in the builder VM.",
)
@click.option("--name", help="Image name (for --oci and -f).")
@click.option("--locked", is_flag=True, help="Install exactly the versions in mvm.lock.")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="HOST[:PORT]",
    help="A host RUN/[build] steps may reach besides the registries preset (repeatable).",
)
@fail_on_errors
def build(
    directory: Path | None,
    preset: str | None,
    rebuild: bool,
    as_json: bool,
    dockerfile: Path | None,
    oci: Path | None,
    name: str | None,
    locked: bool,
    allow: tuple[str, ...],
) -> None:
    """Build (or reuse) an image from a preset or a directory with mvm.toml.

    With neither, builds the default preset (python). A Dockerfile (-f), an OCI archive
    (--oci) or an mvm.toml with a [build] table is built inside the builder VM.
    """
    if directory is not None and preset is not None:
        raise InvalidArgument("give a DIRECTORY or --preset, not both")
    from mvm.cli.builder import build_in_builder
    from mvm.cli.ui import RichReporter, stderr_is_tty

    built = build_in_builder(directory, dockerfile, oci, name, locked, as_json, allow)
    if built is not None:
        _print_image(built, as_json)
        return
    if directory is not None:
        m = manifests.load_dir(directory)
    else:
        m = manifests.load_preset(preset or manifests.DEFAULT_IMAGE)
    with RichReporter(enabled=stderr_is_tty() and not as_json) as rep:
        img = ImageStore().build(m, reporter=rep, rebuild=rebuild)
    _print_image(img, as_json)


def _print_image(img: Image, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode(img).decode())
    else:
        aliases = f" (aliases: {', '.join(img.aliases)})" if img.aliases else ""
        click.echo(
            f"{img.name}{aliases}  {img.id[:12]}  kernel {img.kernel_release}  "
            f"rootfs {img.rootfs_bytes >> 20} MiB"
        )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@fail_on_errors
def images(as_json: bool) -> None:
    """List built images."""
    imgs = ImageStore().all()
    if as_json:
        click.echo(json.dumps([msgspec.to_builtins(i) for i in imgs]))
        return
    for i in imgs:
        aliases = ",".join(i.aliases) or "-"
        click.echo(
            f"{i.name:<16} {i.id[:12]}  aliases={aliases:<16} {i.manifest.suite:<9} "
            f"{i.rootfs_bytes >> 20} MiB"
        )


COMMANDS = [doctor, build, images]
