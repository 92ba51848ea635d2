"""``mvm.Sandbox`` (the implementation) and ``mvm.AsyncSandbox`` (a thin asyncio wrapper).

``Sandbox`` is synchronous and performs every call through a ``Backend``: mvmd in live
mode, the IR recorder in record mode (``mvm.sdk.mode``). ``AsyncSandbox`` runs the same
calls in worker threads, so there is one implementation. mvmd is started if it is not
running (as the CLI does).
"""

from __future__ import annotations

import builtins
import re
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm import names
from mvm.api import models as M
from mvm.durations import parse_duration
from mvm.errors import InvalidArgument, MvmError, SandboxNotFound
from mvm.sdk import code as _code
from mvm.sdk import include as includes
from mvm.sdk import mode
from mvm.sdk.backend import Backend, SandboxSpec
from mvm.sdk.commands import AsyncCommands, Commands, aiter_thread
from mvm.sdk.files import AsyncFiles, Files
from mvm.sdk.logs import logs as _logs
from mvm.sdk.options import EnvValue, Network, Resources, split_env
from mvm.sdk.ports import AsyncPorts, Ports
from mvm.sdk.threads import to_thread

#: The SDK's own rule for label names (workload_id, tag keys), on top of the shape's
#: bounds: a script's labels stay plain words (mvmd also takes E2B metadata keys).
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
DEFAULT_TTL: str | float = M.DEFAULT_TTL


@dataclass(frozen=True)
class Snapshot:
    """A saved sandbox state; pass ``id`` to ``resume(snapshot=...)``."""

    id: str
    name: str
    sandbox: str
    created: float
    size: int
    audit_id: str | None = None


def caller_dir(depth: int) -> Path:
    """The include base: the directory of the calling file's ``__file__``, else of
    ``sys.argv[0]``, else the current directory."""
    try:
        f = sys._getframe(depth + 1).f_globals.get("__file__")
    except ValueError:
        f = None
    if isinstance(f, str) and Path(f).is_file():
        return Path(f).resolve().parent
    if sys.argv and sys.argv[0] and Path(sys.argv[0]).is_file():
        return Path(sys.argv[0]).resolve().parent
    return Path.cwd()


def build_spec(
    image: str,
    *,
    name: str | None,
    workload_id: str | None,
    ttl: str | float,
    include: list[str] | tuple[str, ...],
    tags: dict[str, str] | None,
    resources: Resources | None,
    network: Network | None,
    env: dict[str, EnvValue] | None,
    base: Path,
) -> SandboxSpec:
    """Validate everything ``create`` takes (InvalidArgument at the call) into a spec:
    the argument types here, the shape's own rules in ``M.check_shape`` (as mvmd does)."""
    names.check("image", image)
    if name is not None:
        names.check("sandbox", name)
    if workload_id is not None and (
        not isinstance(workload_id, str) or not LABEL_RE.match(workload_id)
    ):
        raise InvalidArgument(f"invalid workload_id {workload_id!r}")
    tag_map = dict(tags or {})
    for k, v in tag_map.items():
        if not isinstance(k, str) or not LABEL_RE.match(k):
            raise InvalidArgument(f"invalid tag name {k!r}")
        if not isinstance(v, str):
            raise InvalidArgument(f"tag {k} must be a str, not {type(v).__name__}")
    res = resources or Resources()
    if not isinstance(res, Resources):
        raise InvalidArgument("resources= takes mvm.resources(...)")
    net = network or Network()
    if not isinstance(net, Network):
        raise InvalidArgument("network= takes mvm.network(...)")
    plain, secrets = split_env(env)
    files = includes.collect(base, include) if include else []
    mounts = sorted({str(base.resolve() / includes.check_entry(e)) for e in include or ()})
    spec = SandboxSpec(
        image=image,
        name=name,
        cpus=res.cpu_cores,
        memory_mb=res.memory_mb,
        disk_mb=res.rootfs_size_mb,
        ttl_seconds=parse_duration(ttl, "ttl"),
        network=net.spec(),
        env=plain,
        secret_env=secrets,
        tags=tag_map,
        workload_id=workload_id,
        includes=tuple(files),
        mounts=tuple(mounts),
        include_root=str(base.resolve()) if include else None,
    )
    M.check_shape(spec)
    return spec


class Sandbox:
    """A named microVM sandbox. Make one with ``Sandbox.create`` (a context manager that
    stops it on exit) or attach with ``Sandbox.connect``."""

    def __init__(self, backend: Backend, info: M.SandboxInfo) -> None:
        self._be = backend
        self._key = info.name
        self._info = info
        self.name = info.name
        self.id = info.id
        self.image = info.image
        self.audit_id = info.audit_id
        self.files = Files(backend, self._key)
        self.commands = Commands(backend, self._key)
        self.ports = Ports(backend, self._key)

    def __repr__(self) -> str:
        return f"Sandbox(name={self.name!r}, image={self.image!r})"

    @property
    def recording(self) -> bool:
        """True in record mode (results are placeholders)."""
        return self._be.recording

    # -- making and finding -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str = M.DEFAULT_IMAGE,
        *,
        name: str | None = None,
        workload_id: str | None = None,
        ttl: str | float = DEFAULT_TTL,
        include: list[str] | tuple[str, ...] = (),
        tags: dict[str, str] | None = None,
        resources: Resources | None = None,
        network: Network | None = None,
        env: dict[str, EnvValue] | None = None,
    ) -> Sandbox:
        """Boot a sandbox of ``image``; ``include`` paths (relative to the calling script's
        directory) are copied to ``/work/<path>``. Unknown images raise ImageNotFound
        listing the known ones."""
        spec = build_spec(
            image,
            name=name,
            workload_id=workload_id,
            ttl=ttl,
            include=include,
            tags=tags,
            resources=resources,
            network=network,
            env=env,
            base=caller_dir(1) if include else Path.cwd(),
        )
        return cls._create(spec)

    @classmethod
    def _create(cls, spec: SandboxSpec, backend: Backend | None = None) -> Sandbox:
        be = backend or mode.backend()
        return cls(be, be.create(spec))

    @classmethod
    def connect(cls, name: str) -> Sandbox:
        """Attach to an existing sandbox (e.g. one made by ``mvmctl up``)."""
        names.check("sandbox", name)
        be = mode.backend()
        return cls(be, be.connect(name))

    @classmethod
    def list(cls) -> list[M.SandboxInfo]:
        """Every sandbox mvmd knows (name, image, state, ttl_left, ...)."""
        return mode.backend().list_sandboxes()

    # -- state ----------------------------------------------------------------------------
    def info(self) -> M.SandboxInfo:
        self._info = self._be.info(self._key)
        return self._info

    @property
    def state(self) -> str:
        return self.info().state

    def set_ttl(self, ttl: str | float) -> None:
        seconds = parse_duration(ttl, "ttl")
        M.check_ttl(seconds)
        self._info = self._be.set_ttl(self._key, seconds)

    def pause(self) -> None:
        """Freeze the VM (no CPU); ``resume()`` continues it."""
        self._info = self._be.pause(self._key)

    def resume(self, snapshot: str | Snapshot | None = None) -> None:
        """Continue a paused sandbox, or with ``snapshot=`` put it back to that snapshot
        (recreating it if it was stopped) and leave it running."""
        if snapshot is None:
            self._info = self._be.resume(self._key)
            return
        snap = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
        names.check("snapshot", snap)
        self._info = self._be.restore(self._key, snap)

    def snapshot(self, name: str) -> Snapshot:
        """Save memory, files and processes under ``name`` (kept after ``stop``; removed by
        ``destroy``). Snapshots may hold secrets the guest saw: delete them explicitly."""
        names.check("snapshot", name)
        s = self._be.snapshot(self._key, name)
        return Snapshot(s.name, s.name, s.sandbox, s.created, s.size, s.audit_id)

    def fork(self, count: int = 1, name: str | None = None) -> builtins.list[Sandbox]:
        """``count`` children of this running sandbox, each with its memory, files and
        processes as they are now and independent from then on (its own id, clock,
        entropy and egress proxy; no port forwards). Named ``name`` (one child) or
        ``name-1`` .. ``name-N``; by default after this sandbox."""
        if not isinstance(count, int) or count < 1:
            raise InvalidArgument(f"count must be a positive integer (got {count!r})")
        if name is None:
            name = f"{self.name[:50]}-{secrets.token_hex(3)}"
        names.check("sandbox", name)
        return [Sandbox(self._be, i) for i in self._be.fork(self._key, name, count)]

    def stop(self) -> None:
        """Stop and remove the VM (its snapshots stay: ``resume(snapshot=...)`` recreates)."""
        self._be.stop(self._key)

    kill = stop

    def destroy(self) -> None:
        """Stop the VM if it runs and delete its snapshots: nothing of it is left."""
        self._be.destroy(self._key)

    def logs(
        self, follow: bool = False, redact: bool = True, since: float | None = None
    ) -> Iterator[M.LogEvent]:
        return _logs(self._be, self._key, follow=follow, redact=redact, since=since)

    # -- run_code (mvm.sdk.code) ----------------------------------------------------------
    def run_code(self, code: str, language: str = "python", **kw: Any) -> _code.CodeResult:
        """Run a cell in a persistent interpreter (docs/code.md): ``context=``,
        ``timeout_seconds=``, ``on_stdout=``/``on_stderr=`` callbacks."""
        return _code.code_for(self).run(code, language, **kw)

    def create_context(
        self, language: str = "python", name: str | None = None
    ) -> _code.CodeContext:
        return _code.code_for(self).create_context(language, name)

    def restart_context(
        self, context: _code.CodeContext | str | None = None, language: str = "python"
    ) -> _code.CodeContext:
        return _code.code_for(self).restart_context(context, language)

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except SandboxNotFound:
            pass  # already stopped or destroyed
        except MvmError:
            if exc[0] is None:
                raise


class AsyncSandbox:
    """``Sandbox`` for asyncio: the same calls, each run in a worker thread."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox
        self.name = sandbox.name
        self.id = sandbox.id
        self.image = sandbox.image
        self.audit_id = sandbox.audit_id
        self.files = AsyncFiles(sandbox.files)
        self.commands = AsyncCommands(sandbox.commands)
        self.ports = AsyncPorts(sandbox.ports)

    def __repr__(self) -> str:
        return f"AsyncSandbox(name={self.name!r}, image={self.image!r})"

    @classmethod
    async def create(cls, image: str = M.DEFAULT_IMAGE, **kw: Any) -> AsyncSandbox:
        include = kw.get("include") or ()
        base = caller_dir(1) if include else Path.cwd()
        spec = build_spec(
            image,
            name=kw.pop("name", None),
            workload_id=kw.pop("workload_id", None),
            ttl=kw.pop("ttl", DEFAULT_TTL),
            include=kw.pop("include", ()),
            tags=kw.pop("tags", None),
            resources=kw.pop("resources", None),
            network=kw.pop("network", None),
            env=kw.pop("env", None),
            base=base,
        )
        if kw:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kw))}")
        return cls(await to_thread(Sandbox._create, spec))

    @classmethod
    async def connect(cls, name: str) -> AsyncSandbox:
        return cls(await to_thread(Sandbox.connect, name))

    @classmethod
    async def list(cls) -> list[M.SandboxInfo]:
        return await to_thread(Sandbox.list)

    async def info(self) -> M.SandboxInfo:
        return await to_thread(self.sync.info)

    async def set_ttl(self, ttl: str | float) -> None:
        await to_thread(self.sync.set_ttl, ttl)

    async def pause(self) -> None:
        await to_thread(self.sync.pause)

    async def resume(self, snapshot: str | Snapshot | None = None) -> None:
        await to_thread(self.sync.resume, snapshot)

    async def snapshot(self, name: str) -> Snapshot:
        return await to_thread(self.sync.snapshot, name)

    async def fork(self, count: int = 1, name: str | None = None) -> builtins.list[AsyncSandbox]:
        kids = await to_thread(self.sync.fork, count, name)
        return [AsyncSandbox(k) for k in kids]

    async def stop(self) -> None:
        await to_thread(self.sync.stop)

    kill = stop

    async def destroy(self) -> None:
        await to_thread(self.sync.destroy)

    def logs(
        self, follow: bool = False, redact: bool = True, since: float | None = None
    ) -> AsyncIterator[M.LogEvent]:
        return aiter_thread(self.sync.logs(follow=follow, redact=redact, since=since))

    async def run_code(self, code: str, language: str = "python", **kw: Any) -> _code.CodeResult:
        result: _code.CodeResult = await _code.arun(self.sync.run_code, code, language, **kw)
        return result

    async def create_context(
        self, language: str = "python", name: str | None = None
    ) -> _code.CodeContext:
        ctx: _code.CodeContext = await _code.arun(self.sync.create_context, language, name)
        return ctx

    async def restart_context(
        self, context: _code.CodeContext | str | None = None, language: str = "python"
    ) -> _code.CodeContext:
        ctx: _code.CodeContext = await _code.arun(self.sync.restart_context, context, language)
        return ctx

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await to_thread(self.sync.__exit__, *exc)
