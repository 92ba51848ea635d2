"""The recorded IR: a versioned JSON document of sandboxes and the ordered operations on them.

Written by record mode (``mvmctl compile``, ``mvmctl run --mode plan``), read by plan mode
and by replay (``mvmctl run --mode live DIR``). Its JSON Schema is ``schemas/ir-v1.json``.
Bytes (file contents, stdin, included files) are never inline: they are named by SHA-256
and stored beside the document as ``files/<sha256>``. Secret values never appear: only
secret names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from mvm.api import models as M
from mvm.errors import InvalidArgument

FORMAT = "mvm-sdk-ir"
VERSION = 1
#: Largest ir.json accepted by replay and plan.
MAX_IR_BYTES = 16 * 1024 * 1024
#: Most operations one IR may hold.
MAX_OPERATIONS = 100_000
SHA_RE = re.compile(r"^[0-9a-f]{64}$")

#: Operation names, in the order the SDK documents them.
OPS = (
    "sandbox.create",
    "sandbox.connect",
    "sandbox.list",
    "sandbox.info",
    "sandbox.set_ttl",
    "sandbox.pause",
    "sandbox.resume",
    "sandbox.snapshot",
    "sandbox.restore",
    "sandbox.stop",
    "sandbox.destroy",
    "commands.run",
    "commands.start",
    "proc.wait",
    "proc.signal",
    "proc.stdin",
    "proc.output",
    "files.write",
    "files.read",
    "files.list",
    "files.stat",
    "files.mkdir",
    "files.remove",
    "files.rename",
    "logs",
    "ports.forward",
    "ports.close",
)


class Blob(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    sha256: str
    size: int


class IncludeRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str  # relative POSIX path; lands at /work/<path>
    sha256: str
    size: int
    mode: int


class SandboxDecl(M.SandboxShape, kw_only=True, forbid_unknown_fields=True):
    """A sandbox the script creates: the one sandbox shape (``api.models.SandboxShape``:
    its fields, defaults and rules) plus what only a recording knows. IR v1 carries no
    ``ports`` or ``kind`` here (forwards are operations; every kind is a plain sandbox):
    ``wire`` leaves them out and ``decode`` refuses anything but their defaults."""

    ref: str
    name: str | None = None
    includes: list[IncludeRecord] = msgspec.field(default_factory=list)
    #: The host directory include paths are relative to, and the included roots (absolute):
    #: what plan mode's admission checks. Replay never reads them.
    include_root: str | None = None
    mounts: list[str] = msgspec.field(default_factory=list)


#: Shape fields IR v1 does not carry on a sandbox declaration.
NOT_IN_V1 = ("ports", "kind")
_SHAPE_DEFAULTS = M.SandboxShape()


class Operation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    seq: int
    op: str
    sandbox: str | None = None
    args: dict[str, Any] = {}


class IR(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: str = FORMAT
    version: int = VERSION
    mvm_version: str = ""
    script: str | None = None
    sandboxes: list[SandboxDecl] = []
    operations: list[Operation] = []


def wire(ir: IR) -> dict[str, Any]:
    """The IR as JSON values, in the v1 layout (``schemas/ir-v1.json``): each sandbox
    declaration's own fields first, then its shape, without the fields v1 does not carry."""
    doc: dict[str, Any] = msgspec.to_builtins(ir)
    sandboxes = []
    for sb in doc["sandboxes"]:
        head = {"ref": sb.pop("ref"), "name": sb.pop("name")}
        for k in NOT_IN_V1:
            del sb[k]
        sandboxes.append(head | sb)
    doc["sandboxes"] = sandboxes
    return doc


def encode(ir: IR) -> bytes:
    for sb in ir.sandboxes:
        check_v1(sb)
    return msgspec.json.format(msgspec.json.encode(wire(ir)), indent=2) + b"\n"


def check_v1(sb: SandboxDecl, origin: str = "ir.json") -> None:
    """What v1 cannot say about a sandbox is refused, not dropped."""
    for k in NOT_IN_V1:
        if getattr(sb, k) != getattr(_SHAPE_DEFAULTS, k):
            raise InvalidArgument(f"{origin}: sandbox {sb.ref!r}: IR v1 has no {k!r}")


def decode(data: bytes, origin: str = "ir.json") -> IR:
    """Parse and check an IR; InvalidArgument says what is wrong (untrusted input)."""
    if len(data) > MAX_IR_BYTES:
        raise InvalidArgument(f"{origin} is larger than {MAX_IR_BYTES >> 20} MiB")
    try:
        ir = msgspec.json.decode(data, type=IR)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidArgument(f"{origin} is not a valid mvm IR: {exc}") from None
    if ir.format != FORMAT or ir.version != VERSION:
        raise InvalidArgument(
            f"{origin}: format {ir.format!r} version {ir.version} is not supported",
            hint=f"this mvm reads {FORMAT} version {VERSION}; compile the script again",
        )
    if len(ir.operations) > MAX_OPERATIONS:
        raise InvalidArgument(f"{origin}: more than {MAX_OPERATIONS} operations")
    refs = {sb.ref for sb in ir.sandboxes} | {
        str(op.args.get("ref")) for op in ir.operations if op.op == "sandbox.connect"
    }
    for sb in ir.sandboxes:
        check_v1(sb, origin)
        try:
            M.check_shape(sb)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{origin}: sandbox {sb.ref!r}: {exc}") from None
        for inc in sb.includes:
            if not SHA_RE.match(inc.sha256):
                raise InvalidArgument(f"{origin}: bad sha256 for include {inc.path!r}")
            check_include_path(inc.path)
    for i, op in enumerate(ir.operations):
        if op.op not in OPS:
            raise InvalidArgument(f"{origin}: operation {i} has unknown op {op.op!r}")
        if op.sandbox is not None and op.sandbox not in refs:
            raise InvalidArgument(f"{origin}: operation {i} names unknown sandbox {op.sandbox!r}")
    return ir


def load(directory: Path) -> IR:
    path = directory / "ir.json"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_IR_BYTES + 1)
    except FileNotFoundError:
        raise InvalidArgument(
            f"{directory} has no ir.json", hint="make one with `mvmctl compile SCRIPT --out DIR`"
        ) from None
    return decode(data, str(path))


def check_include_path(path: str) -> str:
    """A recorded include path must stay relative and inside /work."""
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or "" in parts or "\0" in path:
        raise InvalidArgument(f"bad include path {path!r} in the IR")
    return path


def blob_path(directory: Path, sha256: str) -> Path:
    if not SHA_RE.match(sha256):
        raise InvalidArgument(f"bad sha256 {sha256!r} in the IR")
    return directory / "files" / sha256
