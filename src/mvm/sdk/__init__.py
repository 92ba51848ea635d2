"""The mvm Python SDK: ``Sandbox``/``AsyncSandbox`` and the values ``create`` takes.

The public surface is exactly ``__all__`` (``mvm`` re-exports it unchanged; a test pins the
list). The submodules (``mvm.sdk.sandbox``, ``commands``, ``files``, ``ports``, ``backend``,
``live``, ``record``, ``replay``, ``ir``, ``plan``, ...) are internal: the CLI and the tests
use them, user code should not, and they change without notice.
"""

from mvm import errors
from mvm.sdk.backend import CommandResult, RecordedBytes, RecordedStr, is_placeholder
from mvm.sdk.browser import AsyncBrowserSandbox, BrowserSandbox
from mvm.sdk.code import CodeContext, CodeError, CodeResult
from mvm.sdk.commands import AsyncCommandHandle, CommandHandle
from mvm.sdk.desktop import AsyncDesktopSandbox, DesktopSandbox
from mvm.sdk.options import Network, Resources, SecretRef, network, resources, secret
from mvm.sdk.ports import Forward
from mvm.sdk.sandbox import AsyncSandbox, Sandbox, Snapshot

__all__ = [
    "AsyncBrowserSandbox",
    "AsyncCommandHandle",
    "AsyncDesktopSandbox",
    "AsyncSandbox",
    "BrowserSandbox",
    "CodeContext",
    "CodeError",
    "CodeResult",
    "CommandHandle",
    "CommandResult",
    "DesktopSandbox",
    "Forward",
    "Network",
    "RecordedBytes",
    "RecordedStr",
    "Resources",
    "Sandbox",
    "SecretRef",
    "Snapshot",
    "errors",
    "is_placeholder",
    "network",
    "resources",
    "secret",
]
