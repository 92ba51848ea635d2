"""``mvmctl build`` for builder-VM builds (OCI archives, Dockerfiles, ``[build]`` steps) and
``mvmctl builder up|status``: thin adapters over ``mvm.builder.build``."""

from __future__ import annotations

from pathlib import Path

import click

from mvm.builder import build as builds
from mvm.builder.vmrun import BUILDER_IMAGE
from mvm.cli.common import fail_on_errors
from mvm.cli.ui import RichReporter, stderr_is_tty
from mvm.errors import InvalidArgument
from mvm.images import manifest as manifests
from mvm.images.store import Image, ImageStore


def build_in_builder(
    directory: Path | None,
    dockerfile: Path | None,
    oci: Path | None,
    name: str | None,
    locked: bool,
    quiet: bool,
) -> Image | None:
    """The builder-VM part of ``mvmctl build``; None when the request is a plain host build."""
    with RichReporter(enabled=stderr_is_tty() and not quiet) as rep:
        if oci is not None:
            if directory is not None or dockerfile is not None:
                raise InvalidArgument("--oci takes no DIRECTORY or -f")
            if not name:
                raise InvalidArgument("--oci needs --name NAME for the image")
            return builds.import_oci(oci, name, reporter=rep)
        if dockerfile is not None:
            project = directory or dockerfile.parent
            img_name = name or manifests_name(project)
            return builds.build_dockerfile(
                dockerfile, project, img_name, locked=locked, reporter=rep
            )
        if directory is not None and (directory / "mvm.toml").is_file():
            return builds.build_project(directory, locked=locked, reporter=rep)
    if locked:
        raise InvalidArgument("--locked applies to builds in the builder (-f, or a [build] table)")
    return None


def manifests_name(project: Path) -> str:
    from mvm.project import image_name_for

    return image_name_for(project)


@click.group()
def builder() -> None:
    """The builder VM: where every image except its own is built."""


@builder.command("up")
@fail_on_errors
def builder_up() -> None:
    """Build (or reuse) the builder image, on the host, from the host's apt sources."""
    with RichReporter(enabled=stderr_is_tty()) as rep:
        img = ImageStore().build(manifests.load_preset(BUILDER_IMAGE), reporter=rep)
    click.echo(f"builder image {img.id[:12]} ready ({img.rootfs_bytes >> 20} MiB)")


@builder.command("status")
@fail_on_errors
def builder_status() -> None:
    """The builder image and the builds in progress."""
    store = ImageStore()
    img = store.find(BUILDER_IMAGE)
    click.echo(f"image: {img.id[:12] if img else 'not built (mvmctl builder up)'}")
    running = sorted(store.rootfs_dir.glob(".tmp-build-*")) if store.rootfs_dir.is_dir() else []
    click.echo(f"builds in progress: {len(running)}")
    for r in running:
        click.echo(f"  {r.name.removeprefix('.tmp-build-')}")


COMMANDS = [builder]
