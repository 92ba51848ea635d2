"""The mvm Python SDK: ``Sandbox``/``AsyncSandbox`` and the values ``create`` takes."""

from mvm.sdk.backend import CommandResult, RecordedBytes, RecordedStr, is_placeholder
from mvm.sdk.code import CodeContext, CodeError, CodeResult
from mvm.sdk.commands import AsyncCommandHandle, CommandHandle
from mvm.sdk.options import Network, Resources, SecretRef, network, resources, secret
from mvm.sdk.ports import Forward
from mvm.sdk.sandbox import AsyncSandbox, Sandbox, Snapshot

__all__ = [
    "AsyncCommandHandle",
    "AsyncSandbox",
    "CodeContext",
    "CodeError",
    "CodeResult",
    "CommandHandle",
    "CommandResult",
    "Forward",
    "Network",
    "RecordedBytes",
    "RecordedStr",
    "Resources",
    "Sandbox",
    "SecretRef",
    "Snapshot",
    "is_placeholder",
    "network",
    "resources",
    "secret",
]
