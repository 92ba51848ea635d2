"""``mvmctl build`` for builder-VM builds (OCI archives, Dockerfiles, ``[build]`` steps) and
``mvmctl builder up|status|logs|down``: thin adapters over ``mvm.builder.build`` and
mvmd's builder sandboxes (``mvm.service.builders``)."""

from __future__ import annotations

from pathlib import Path

import click

from mvm.api import models as M
from mvm.builder import build as builds
from mvm.builder.session import running_daemon
from mvm.builder.vmrun import BUILDER_IMAGE
from mvm.cli.common import connect, emit_json, fail_on_errors
from mvm.cli.ui import RichReporter, stderr_is_tty
from mvm.durations import parse_duration
from mvm.errors import InvalidArgument, SandboxNotFound
from mvm.images import manifest as manifests
from mvm.images.store import Image, ImageStore
from mvm.service.builders import BuilderInfo, BuilderRequest


def build_in_builder(
    directory: Path | None,
    dockerfile: Path | None,
    oci: Path | None,
    name: str | None,
    locked: bool,
    quiet: bool,
    allow: tuple[str, ...] = (),
) -> Image | None:
    """The builder-VM part of ``mvmctl build``; None when the request is a plain host build."""
    with RichReporter(enabled=stderr_is_tty() and not quiet) as rep:
        if oci is not None:
            if directory is not None or dockerfile is not None:
                raise InvalidArgument("--oci takes no DIRECTORY or -f")
            if not name:
                raise InvalidArgument("--oci needs --name NAME for the image")
            if allow:
                raise InvalidArgument("--allow: an OCI import makes no connection")
            return builds.import_oci(oci, name, reporter=rep)
        if dockerfile is not None:
            project = directory or dockerfile.parent
            img_name = name or manifests_name(project)
            return builds.build_dockerfile(
                dockerfile,
                project,
                img_name,
                locked=locked,
                reporter=rep,
                network_allow=list(allow),
            )
        if directory is not None and (directory / "mvm.toml").is_file():
            built = builds.build_project(
                directory, locked=locked, reporter=rep, network_allow=list(allow)
            )
            if built is not None or not allow:
                return built
    if locked:
        raise InvalidArgument("--locked applies to builds in the builder (-f, or a [build] table)")
    if allow:
        raise InvalidArgument(
            "--allow applies to builds in the builder (-f, or a [build] table)",
            hint="a preset or a plain mvm.toml is built from Debian packages only",
        )
    return None


def manifests_name(project: Path) -> str:
    from mvm.project import image_name_for

    return image_name_for(project)


@click.group()
def builder() -> None:
    """The builder VM: where every image except its own is built."""


def _builders(c: object) -> list[BuilderInfo]:
    from mvm.client import Client

    assert isinstance(c, Client)
    return c._get("/builders", list[BuilderInfo])


def _pick(c: object, name: str | None) -> str:
    got = [b.sandbox.name for b in _builders(c)]
    if name is not None:
        if name not in got:  # `builder` verbs act on builder VMs only, never a sandbox
            raise SandboxNotFound(
                f"no builder VM named {name!r}", hint="mvmctl builder status lists them"
            )
        return name
    if not got:
        raise InvalidArgument("no builder VM is up", hint="mvmctl builder up")
    return got[-1]  # the newest


@builder.command("up")
@click.option(
    "--idle",
    default=None,
    help="Down it when no build claims it for this long (default: MVM_BUILDER_IDLE or 10m).",
)
@click.option("--allow", multiple=True, help="A host its builds may reach beyond `registries`.")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def builder_up(idle: str | None, allow: tuple[str, ...], as_json: bool) -> None:
    """Keep a warm builder VM running in mvmd (the builder image is built first if needed,
    on the host, from the host's apt sources). The next build uses it."""
    with RichReporter(enabled=stderr_is_tty() and not as_json) as rep:
        img = ImageStore().build(manifests.load_preset(BUILDER_IMAGE), reporter=rep)
    req = BuilderRequest(
        allow=list(allow), idle_seconds=parse_duration(idle, "--idle") if idle else None
    )
    with connect() as c:
        info = c._post("/builders", M.SandboxInfo, req, timeout=1800.0)
    if as_json:
        emit_json(info)
        return
    click.echo(
        f"builder {info.name} up (image {img.id[:12]}, booted in {info.boot_seconds or 0:.1f}s, "
        f"idle stop in {info.ttl_left:.0f}s)"
    )


@builder.command("status")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def builder_status(as_json: bool) -> None:
    """The builder image, the builder VMs in mvmd and the builds in progress."""
    store = ImageStore()
    img = store.find(BUILDER_IMAGE)
    client = running_daemon()
    builders: list[BuilderInfo] = []
    if client is not None:
        with client:
            builders = _builders(client)
    local = sorted(store.rootfs_dir.glob(".tmp-build-*")) if store.rootfs_dir.is_dir() else []
    if as_json:
        emit_json(
            {
                "image": img.id if img else None,
                "mvmd": client is not None,
                "builders": builders,
                "builds": [p.name.removeprefix(".tmp-build-") for p in local],
            }
        )
        return
    click.echo(f"image: {img.id[:12] if img else 'not built (mvmctl builder up)'}")
    if client is None:
        click.echo("builders: none (mvmd is not running)")
    else:
        click.echo(f"builders: {len(builders)}")
    for b in builders:
        s = b.sandbox
        what = "building" if b.claimed else f"warm, idle stop in {s.ttl_left:.0f}s"
        click.echo(f"  {s.name}  {s.state}  {what}")
    click.echo(f"builds in progress: {len(local)}")
    for r in local:
        click.echo(f"  {r.name.removeprefix('.tmp-build-')}")


@builder.command("logs")
@click.argument("name", required=False)
@click.option("-f", "--follow", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@fail_on_errors
def builder_logs(name: str | None, follow: bool, as_json: bool) -> None:
    """The log of a builder VM (default: the newest): its console and build output."""
    import time

    with connect() as c:
        for ev in c.logs(_pick(c, name), follow=follow):
            if as_json:
                emit_json(ev)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(ev.timestamp))
                click.echo(f"{stamp} {ev.stream:<16} {ev.message}")


@builder.command("down")
@click.argument("name", required=False)
@fail_on_errors
def builder_down(name: str | None) -> None:
    """Remove a builder VM (default: every one that is not building)."""
    with connect() as c:
        if name is not None:
            targets = [_pick(c, name)]
        else:
            targets = [b.sandbox.name for b in _builders(c) if not b.claimed]
        for n in targets:
            c.down(n)
            click.echo(f"{n} down")
        if not targets:
            click.echo("no builder VM to down")


COMMANDS = [builder]
