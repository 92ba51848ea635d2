"""One error hierarchy. Each error carries data, a message, and a hint with the fix."""

from __future__ import annotations

from typing import Any


class MvmError(Exception):
    """Base of every error mvm raises on purpose.

    ``hint`` says what the user can do about it; ``data`` carries the facts
    (paths, names, limits) for programs that catch it.
    """

    #: Exit status the CLI uses for this error.
    exit_code = 125

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
    pass


class UnknownPreset(ImageError):
    pass


class ManifestError(ImageError):
    pass


class ImageBuildError(ImageError):
    pass


class VMError(MvmError):
    """The VM could not be started, or it died."""


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


class CommandFailed(MvmError):
    """A command exited non-zero and the caller asked for ``check=True`` (data: argv,
    exit_code). The SDK sets ``result`` to the command's result."""

    exit_code = 1


class InvalidArgument(MvmError):
    exit_code = 2


class SandboxNotFound(MvmError):
    pass


class SandboxExists(MvmError):
    """The name is taken by another sandbox."""


class SandboxStateError(MvmError):
    """The sandbox is in a state that does not allow this (e.g. exec while paused)."""


class SnapshotNotFound(MvmError):
    pass


class SnapshotExists(MvmError):
    pass


class ForwardNotFound(MvmError):
    """No port forward with that id on that sandbox."""


class PolicyDenied(MvmError):
    """Admission refused a launch (data: rules, denials)."""


class PolicyFileError(MvmError):
    """The policy file cannot be read or parsed."""

    exit_code = 2


class SecretError(MvmError):
    """The secret store refused an operation (bad name, bad value, unreadable store)."""


class SecretNotFound(SecretError):
    """No secret of that name (data: name, known)."""
