"""Request and response bodies of the mvmd HTTP API, shared by the daemon and its clients.

The API is HTTP/1.1 + JSON over a Unix socket (``$MVM_HOME/mvmd.sock``, mode
0600). Streaming endpoints (exec, logs) answer with NDJSON: one JSON object per
line, bytes base64-encoded in ``data``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from typing import Annotated, Any, TypeVar

import msgspec

from mvm import errors

API_VERSION = "v1"

#: Largest body accepted by the API (file writes, stdin): larger files go in pieces.
MAX_BODY = 64 * 1024 * 1024
#: Largest file `fs write` / `files.write` accepts in one call.
MAX_FILE_WRITE = MAX_BODY
#: Largest file `fs read` returns.
MAX_FILE_READ = 64 * 1024 * 1024
#: Default and largest TTL of a sandbox (seconds).
DEFAULT_TTL = 30 * 60.0
MAX_TTL = 7 * 24 * 3600.0
#: Bounds on the caller's labels (workload_id, tags): one value for the SDK and mvmd.
MAX_TAGS = 32
MAX_LABEL = 256
#: A sandbox's defaults and bounds when nothing else is said (policy may narrow them).
DEFAULT_IMAGE = "python"
DEFAULT_CPUS = 1
DEFAULT_MEMORY_MB = 512
MAX_CPUS = 16
MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 16384
#: Bounds of the writable layer (``disk_mb``; by default half the memory).
MIN_DISK_MB, MAX_DISK_MB = 16, 65536
#: Each bounded integer of the shape: (least, most).
BOUNDS = {
    "cpus": (1, MAX_CPUS),
    "memory_mb": (MIN_MEMORY_MB, MAX_MEMORY_MB),
    "disk_mb": (MIN_DISK_MB, MAX_DISK_MB),
}
#: The kinds of sandbox mvm runs (more come with browser, desktop and builder VMs).
KINDS = ("sandbox", "builder")


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str
    message: str
    hint: str | None = None
    data: dict[str, object] = {}


class NetworkSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a sandbox may reach. ``preset``: none (no NIC at all, the default),
    registries, dev, unrestricted; ``allow``: extra ``host[:port]`` patterns
    (``*.example.org`` wildcards)."""

    preset: str = "none"
    allow: list[str] = []


class PortSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A host port forwarded to a guest port (TCP). Binds 127.0.0.1 unless told otherwise;
    a wildcard address needs ``allow_wildcard``."""

    guest_port: int
    host_port: int = 0  # 0: any free port
    host: str = "127.0.0.1"
    allow_wildcard: bool = False


class ForwardInfo(msgspec.Struct, kw_only=True):
    id: str
    host: str
    host_port: int
    guest_port: int
    audit_id: str | None = None


class SandboxShape(msgspec.Struct, kw_only=True):
    """The one shape of a sandbox: what it runs, on what, for how long, reaching what.

    The API's create body is this plus a name; the state record and the snapshot record
    extend it with their facts (id, state, pid, path); admission's plan and the VM spec
    are made from it (``admission.plan_from_shape``, ``service.core.spec_for``).
    """

    image: str = DEFAULT_IMAGE
    cpus: int = DEFAULT_CPUS
    memory_mb: int = DEFAULT_MEMORY_MB
    disk_mb: int | None = None  # size of the writable layer; default half the memory
    ttl_seconds: float = DEFAULT_TTL
    env: dict[str, str] = {}
    #: Environment variables whose values are secrets, by secret NAME (resolved by mvmd
    #: at each command; values are never stored).
    secret_env: dict[str, str] = {}
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)
    ports: list[PortSpec] = []
    #: The caller's labels, returned as given (bounded: MAX_LABEL, MAX_TAGS).
    workload_id: str | None = None
    tags: dict[str, str] = {}
    kind: str = "sandbox"


def shape_fields(obj: SandboxShape) -> dict[str, object]:
    """The shape part of anything that extends it, as keyword arguments."""
    return {f: getattr(obj, f) for f in SandboxShape.__struct_fields__}


S = TypeVar("S", bound=SandboxShape)


def extend(cls: type[S], shape: SandboxShape, **extra: Any) -> S:
    """A ``cls`` (anything that extends the shape) with ``shape``'s fields and ``extra``:
    how the SDK's spec, the IR's declaration and the API's create body pass one shape on."""
    fields: dict[str, Any] = shape_fields(shape)
    return cls(**(fields | extra))


def check_shape(shape: SandboxShape) -> None:
    """The rules of a shape that are not policy (policy is admission's): kind, resources,
    TTL, labels. mvmd checks them at create; the SDK at the call; replay in the IR."""
    if shape.kind not in KINDS:
        raise errors.InvalidArgument(
            f"unknown sandbox kind {shape.kind!r}", hint="kinds: " + ", ".join(KINDS)
        )
    for field in BOUNDS:
        value = getattr(shape, field)
        if value is not None:  # disk_mb: None is "half the memory"
            check_bound(field, value)
    check_ttl(shape.ttl_seconds)
    if shape.workload_id is not None and not 0 < len(shape.workload_id) <= MAX_LABEL:
        raise errors.InvalidArgument(f"workload_id must be 1 to {MAX_LABEL} characters")
    if len(shape.tags) > MAX_TAGS:
        raise errors.InvalidArgument(f"at most {MAX_TAGS} tags (got {len(shape.tags)})")
    for k, v in shape.tags.items():
        if not 0 < len(k) <= MAX_LABEL or len(v) > MAX_LABEL:
            raise errors.InvalidArgument(
                f"tag {k[:40]!r}: keys must be 1 to {MAX_LABEL} characters, "
                f"values at most {MAX_LABEL}"
            )


def check_ttl(seconds: float) -> None:
    """A sandbox's TTL, at create and at every ``set-ttl`` (policy may cap it lower)."""
    if not 0 < seconds <= MAX_TTL:
        raise errors.InvalidArgument(
            f"TTL must be between 0 and {MAX_TTL:.0f} seconds (got {seconds:g})", max=MAX_TTL
        )


def check_bound(field: str, value: object, called: str | None = None) -> None:
    """``value`` is an integer within the bounds of the shape's ``field`` (``BOUNDS``);
    the error names it ``called`` (the caller's own word for it, e.g. the SDK's)."""
    lo, hi = BOUNDS[field]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        what = called or field
        raise errors.InvalidArgument(
            f"{what} must be an integer from {lo} to {hi}, not {value!r}", field=what
        )


class CreateSandbox(SandboxShape, kw_only=True, forbid_unknown_fields=True):
    name: str | None = None
    #: Host directories whose contents enter the guest (checked by admission).
    mounts: list[str] = []
    #: Host paths whose files the client will copy in after create (SDK ``include=``,
    #: ``up DIR``): checked against the policy's ``mount_roots``.
    uploads: list[str] = []
    #: Each command's cgroup in the guest: ``{"pids_max": 1..4194304, "memory_pct": 1..100}``
    #: (either or both; None: the agent's defaults, docs/security.md).
    limits: dict[str, int] | None = None


class SandboxInfo(msgspec.Struct, kw_only=True):
    id: str
    name: str
    image: str
    state: str
    cpus: int
    memory_mb: int
    disk_mb: int
    created: float
    expires_at: float
    ttl_left: float
    pid: int | None = None
    reason: str = ""
    boot_seconds: float | None = None
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)
    forwards: list[ForwardInfo] = []
    workload_id: str | None = None
    tags: dict[str, str] = {}
    audit_id: str | None = None
    #: What a call could not do and why (e.g. a forward not restored with a snapshot).
    warnings: list[str] = []
    #: The per-command cgroup limits asked for at create (None: the guest's defaults).
    limits: dict[str, int] | None = None
    #: Set while a running sandbox's agent does not answer mvmd's health pings: why.
    unresponsive: str | None = None
    #: The cluster host that runs it (set by a cluster front, docs/cluster.md).
    host: str | None = None


def info_for(shape: SandboxShape, **facts: Any) -> SandboxInfo:
    """The API's view of a sandbox: what it shows of the shape (not env or secret names)
    plus the facts of its life (id, name, state, times, ...)."""
    return SandboxInfo(
        image=shape.image,
        cpus=shape.cpus,
        memory_mb=shape.memory_mb,
        disk_mb=shape.disk_mb or 0,
        network=NetworkSpec(preset=shape.network.preset, allow=list(shape.network.allow)),
        workload_id=shape.workload_id,
        tags=dict(shape.tags),
        **facts,
    )


class ExecRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    argv: list[str]
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    stdin: bytes = b""  # base64 in JSON
    timeout: float = 300.0
    output_limit: int = 16 * 1024 * 1024
    #: Environment variables whose values are secrets, by secret name (resolved by mvmd).
    secret_env: dict[str, str] = {}
    #: Keep what the command leaves running after it exits (by default the command's whole
    #: process group, its cgroup in the guest, is killed when it ends).
    detach: bool = False


class ExecEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of an exec stream: output (``stdout``/``stderr`` with data), then ``exit``."""

    type: str
    data: bytes = b""
    exit_code: int | None = None
    timed_out: bool = False
    signal: int | None = None
    duration: float = 0.0
    truncated_stdout: bool = False
    truncated_stderr: bool = False
    error: ErrorBody | None = None
    audit_id: str | None = None


class ExecResult(msgspec.Struct, kw_only=True):
    """The one result of a finished command, whoever gathered it (CLI, SDK, ``mvmctl run``)."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    signal: int | None = None
    duration: float = 0.0
    truncated_stdout: bool = False
    truncated_stderr: bool = False
    audit_id: str | None = None


OutputSink = Callable[[str, bytes], None]


class ExecGatherer:
    """Folds an exec event stream into an ``ExecResult``: output to ``on_output`` as it
    comes (and kept, when ``keep``), the exit event's facts, an error event raised as the
    error class mvmd named."""

    def __init__(self, on_output: OutputSink | None = None, keep: bool = True) -> None:
        self.on_output = on_output
        self.keep = keep
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.end: ExecEvent | None = None

    def feed(self, ev: ExecEvent) -> None:
        if ev.type in self.out:
            if self.keep:
                self.out[ev.type] += ev.data
            if self.on_output is not None:
                self.on_output(ev.type, ev.data)
        elif ev.type == "exit":
            self.end = ev
        elif ev.type == "error":
            body = ev.error or ErrorBody(error="MvmError", message="exec failed")
            raise errors.from_name(body.error, body.message, body.hint, dict(body.data))

    def result(self) -> ExecResult:
        end = self.end
        if end is None:
            raise errors.MvmError("the exec stream ended without an exit event")
        return ExecResult(
            exit_code=end.exit_code if end.exit_code is not None else -1,
            stdout=bytes(self.out["stdout"]),
            stderr=bytes(self.out["stderr"]),
            timed_out=end.timed_out,
            signal=end.signal,
            duration=end.duration,
            truncated_stdout=end.truncated_stdout,
            truncated_stderr=end.truncated_stderr,
            audit_id=end.audit_id,
        )


def gather_exec(
    events: Iterable[ExecEvent], on_output: OutputSink | None = None, keep: bool = True
) -> ExecResult:
    """An exec event stream as one ``ExecResult`` (see ``ExecGatherer``)."""
    g = ExecGatherer(on_output, keep)
    for ev in events:
        g.feed(ev)
    return g.result()


async def agather_exec(
    events: AsyncIterable[ExecEvent], on_output: OutputSink | None = None, keep: bool = True
) -> ExecResult:
    """``gather_exec`` for an async stream (the service in-process)."""
    g = ExecGatherer(on_output, keep)
    async for ev in events:
        g.feed(ev)
    return g.result()


class ProcStart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    argv: list[str]
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    stdin: bytes = b""
    stdin_open: bool = False
    secret_env: dict[str, str] = {}


class ProcView(msgspec.Struct, kw_only=True):
    proc: int
    pid: int
    argv: list[str]
    running: bool
    started: float
    exit_code: int | None = None
    signal: int | None = None
    ended: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    audit_id: str | None = None


class FileEntry(msgspec.Struct, kw_only=True):
    name: str
    type: str
    size: int
    mode: int
    mtime: float


class FileStat(msgspec.Struct, kw_only=True):
    type: str
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0
    audit_id: str | None = None


class LogEvent(msgspec.Struct, kw_only=True):
    """One line of ``logs``: console output or a background process's output."""

    timestamp: float
    stream: str  # "console", or "proc:<id>:stdout" / "proc:<id>:stderr"
    message: str


class SnapshotInfo(msgspec.Struct, kw_only=True):
    sandbox: str
    name: str
    created: float
    size: int
    image: str
    audit_id: str | None = None


class UploadCheck(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Host paths a client is about to copy into a running sandbox (policy: mount_roots)."""

    paths: list[str]


class TtlRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ttl_seconds: float


class SnapshotRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class DaemonStatus(msgspec.Struct, kw_only=True):
    pid: int
    version: str
    started: float
    sandboxes: int
    socket: str
    #: The pool of waiting VMs (``service.pool``): size, idle, idle_mb, handed_out, ...
    pool: dict[str, int] = {}


#: A client's name for its own kind of call (``mcp``) and the call's name (a tool).
CALL_VIA = r"^[a-z][a-z0-9]{0,15}$"
CALL_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"


class CallNote(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An adapter's own call (an MCP tool, say) for mvmd to audit: the record is written by
    the service like every other, signed, with the request's actor and routed to the
    sandbox's tenant. The adapter names its call; what the call then does is audited by
    the verbs it uses."""

    via: Annotated[str, msgspec.Meta(pattern=CALL_VIA)]
    call: Annotated[str, msgspec.Meta(pattern=CALL_NAME)]


class Noted(msgspec.Struct, kw_only=True):
    audit_id: str | None
