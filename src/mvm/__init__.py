"""mvm: microVM sandboxes for untrusted code. The public SDK surface.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.11") as sandbox:  # doctest: +SKIP
...     print(sandbox.commands.run(["python", "-c", "print(1)"]).stdout)
"""

from mvm import errors
from mvm.sdk import (
    AsyncSandbox,
    CommandResult,
    Network,
    Resources,
    Sandbox,
    SecretRef,
    Snapshot,
    is_placeholder,
    network,
    resources,
    secret,
)
from mvm.sdk.browser import AsyncBrowserSandbox, BrowserSandbox
from mvm.sdk.desktop import AsyncDesktopSandbox, DesktopSandbox

__all__ = [
    "AsyncBrowserSandbox",
    "AsyncDesktopSandbox",
    "AsyncSandbox",
    "BrowserSandbox",
    "CommandResult",
    "DesktopSandbox",
    "Network",
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
