"""``mvmctl init`` and ``mvmctl up``: write a project, start a named sandbox (building the
project's image first when it changed)."""

from __future__ import annotations

from pathlib import Path

import click

from mvm.api import models as M
from mvm.cli.common import (
    check_name,
    connect,
    emit_json,
    fail_on_errors,
    network_options,
    split_env,
)
from mvm.cli.ports import describe as describe_forward
from mvm.cli.ports import port_specs
from mvm.durations import parse_duration

#: ``init --preset`` choices (mvm.project.PRESETS; a unit test keeps them equal, so that
#: this module does not import the project and image code for every command).
PROJECT_PRESETS = ("http", "minimal", "python", "worker")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(PROJECT_PRESETS), default="python", show_default=True)
@fail_on_errors
def init(directory: Path, preset: str) -> None:
    """Write a project (mvm.toml + example files) into DIRECTORY."""
    from mvm.project import init_project

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
    "--pids-max",
    type=click.IntRange(1, 1 << 22),
    help="Tasks each command may have in its cgroup (default 1024).",
)
@click.option(
    "--memory-share",
    type=click.IntRange(1, 100),
    help="Percent of the commands' memory one command may use (default 100).",
)
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
    pids_max: int | None,
    memory_share: int | None,
    detach: bool,
    as_json: bool,
) -> None:
    """Start a named sandbox (from a project DIRECTORY, or an --image) and leave it running."""
    from mvm.images import manifest as manifests

    files = []
    envs, secret_envs = split_env(env)
    port_list = port_specs(ports)
    if directory is not None:
        from mvm.cli.ui import RichReporter, stderr_is_tty
        from mvm.images.store import ImageStore
        from mvm.project import uploads

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
        limits={
            k: v for k, v in (("pids_max", pids_max), ("memory_pct", memory_share)) if v is not None
        }
        or None,
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
