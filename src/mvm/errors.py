"""One error hierarchy. Each error carries data, a message, and a hint with the fix.

Each class says how it leaves mvm: ``http_status`` (what mvmd answers) and
``exit_code`` (what the CLI exits with). mvmd sends the class name; the client
rebuilds the same class (``from_name``), so a caller catches the same type in-process
and over the socket.
"""

from __future__ import annotations

from typing import Any


class MvmError(Exception):
    """Base of every error mvm raises on purpose.

    ``hint`` says what the user can do about it; ``data`` carries the facts
    (paths, names, limits) for programs that catch it.
    """

    #: Exit status the CLI uses for this error.
    exit_code = 125
    #: HTTP status mvmd answers with for this error.
    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.data = data

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            **{k: v for k, v in self.data.items() if isinstance(v, (str, int, float, bool))},
        }


class HostError(MvmError):
    """The host lacks something mvm needs (qemu, apt sources, disk space)."""


class QemuNotFound(HostError):
    pass


class ImageError(MvmError):
    pass


class ImageNotFound(ImageError):
    http_status = 404


class UnknownPreset(ImageError):
    http_status = 404


class ManifestError(ImageError):
    pass


class ImageBuildError(ImageError):
    pass


class VMError(MvmError):
    """The VM could not be started, or it died."""

    http_status = 502


class VMBootTimeout(VMError):
    pass


class VMDied(VMError):
    pass


class AgentError(MvmError):
    """The guest agent answered a request with an error (data: code)."""


class AgentProtocolError(VMError):
    """The guest broke the protocol. The guest is untrusted: the VM is treated as failed."""


class CommandTimeout(MvmError):
    exit_code = 124
    http_status = 504


class CommandFailed(MvmError):
    """A command exited non-zero and the caller asked for ``check=True`` (data: argv,
    exit_code). The SDK sets ``result`` to the command's result."""

    exit_code = 1


class InvalidArgument(MvmError):
    exit_code = 2
    http_status = 400


class SandboxNotFound(MvmError):
    http_status = 404


class SandboxExists(MvmError):
    """The name is taken by another sandbox."""

    http_status = 409


class SandboxStateError(MvmError):
    """The sandbox is in a state that does not allow this (e.g. exec while paused)."""

    http_status = 409


class SnapshotNotFound(MvmError):
    http_status = 404


class SnapshotExists(MvmError):
    http_status = 409


class ForwardNotFound(MvmError):
    """No port forward with that id on that sandbox."""

    http_status = 404


class PolicyDenied(MvmError):
    """Admission refused a launch (data: rules, denials)."""

    http_status = 403


class PolicyFileError(MvmError):
    """The policy file cannot be read or parsed."""

    exit_code = 2


class SecretError(MvmError):
    """The secret store refused an operation (bad name, bad value, unreadable store)."""


class SecretNotFound(SecretError):
    """No secret of that name (data: name, known)."""


class InvalidTransition(SandboxStateError):
    """A state change the sandbox state machine does not allow (data: sandbox, state)."""


class StateLoadError(VMError):
    """QEMU could not load a saved state (a template or a snapshot): the file is at fault,
    not a connection."""


class AuditError(MvmError):
    """The audit log could not be written or read, or a record is malformed."""


#: mvm's answers to the guest agent's error codes (an AgentError carries ``code``).
AGENT_HTTP_STATUS = {
    "not_found": 404,
    "exists": 409,
    "too_large": 413,
    "bad_request": 400,
    "permission_denied": 403,
    "is_a_directory": 400,
    "not_a_directory": 400,
    "not_empty": 409,
    "no_space": 507,
}


def http_status(exc: MvmError) -> int:
    """The HTTP status of an error: its class's, or for an agent error, its code's."""
    if isinstance(exc, AgentError):
        return AGENT_HTTP_STATUS.get(str(exc.data.get("code")), 400)
    return exc.http_status


def from_name(name: str, message: str, hint: str | None, data: dict[str, Any]) -> MvmError:
    """Rebuild an error sent by name (mvmd's ErrorBody): the same class, or MvmError."""
    cls = globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, MvmError)):
        cls = MvmError
    return cls(message, hint=hint, **data)
