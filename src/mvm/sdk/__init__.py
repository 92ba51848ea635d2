"""The mvm Python SDK: ``Sandbox``/``AsyncSandbox`` and the values ``create`` takes.

The public surface is exactly ``__all__`` (``mvm`` re-exports it unchanged; a test pins the
list). The submodules (``mvm.sdk.sandbox``, ``commands``, ``files``, ``ports``, ``backend``,
``live``, ``record``, ``replay``, ``ir``, ``plan``, ...) are internal: the CLI and the tests
use them, user code should not, and they change without notice.

Each name is imported from its submodule on first use (PEP 562), so importing
``mvm.sdk.options`` or ``mvm`` alone does not load the browser, desktop or code classes.
"""

import importlib as _importlib

TYPE_CHECKING = False  # not typing's: see mvm/__init__.py
if TYPE_CHECKING:
    from mvm import errors
    from mvm.sdk.backend import CommandResult, RecordedBytes, RecordedStr, is_placeholder
    from mvm.sdk.browser import AsyncBrowserSandbox, BrowserSandbox
    from mvm.sdk.code import CodeContext, CodeError, CodeResult
    from mvm.sdk.commands import AsyncCommandHandle, CommandHandle
    from mvm.sdk.desktop import AsyncDesktopSandbox, DesktopSandbox
    from mvm.sdk.options import Network, Resources, SecretRef, network, resources, secret
    from mvm.sdk.ports import Forward
    from mvm.sdk.sandbox import AsyncSandbox, Sandbox, Snapshot
del TYPE_CHECKING  # not a public name of mvm.sdk

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

#: Where each public name lives (its module; ``errors`` is a module itself).
_HOME = {
    "AsyncBrowserSandbox": "mvm.sdk.browser",
    "AsyncCommandHandle": "mvm.sdk.commands",
    "AsyncDesktopSandbox": "mvm.sdk.desktop",
    "AsyncSandbox": "mvm.sdk.sandbox",
    "BrowserSandbox": "mvm.sdk.browser",
    "CodeContext": "mvm.sdk.code",
    "CodeError": "mvm.sdk.code",
    "CodeResult": "mvm.sdk.code",
    "CommandHandle": "mvm.sdk.commands",
    "CommandResult": "mvm.sdk.backend",
    "DesktopSandbox": "mvm.sdk.desktop",
    "Forward": "mvm.sdk.ports",
    "Network": "mvm.sdk.options",
    "RecordedBytes": "mvm.sdk.backend",
    "RecordedStr": "mvm.sdk.backend",
    "Resources": "mvm.sdk.options",
    "Sandbox": "mvm.sdk.sandbox",
    "SecretRef": "mvm.sdk.options",
    "Snapshot": "mvm.sdk.sandbox",
    "is_placeholder": "mvm.sdk.backend",
    "network": "mvm.sdk.options",
    "resources": "mvm.sdk.options",
    "secret": "mvm.sdk.options",
}


def __getattr__(name: str) -> object:
    if name == "errors":
        value: object = _importlib.import_module("mvm.errors")
    elif name in _HOME:
        value = getattr(_importlib.import_module(_HOME[name]), name)
    else:
        raise AttributeError(f"module 'mvm.sdk' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
