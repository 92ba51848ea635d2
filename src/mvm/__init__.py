"""mvm: microVM sandboxes for untrusted code. The public SDK surface.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.11") as sandbox:  # doctest: +SKIP
...     print(sandbox.commands.run(["python", "-c", "print(1)"]).stdout)
"""

from mvm import errors
from mvm.sdk import (
    AsyncSandbox,
    CodeContext,
    CodeError,
    CodeResult,
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

__all__ = [
    "AsyncSandbox",
    "CodeContext",
    "CodeError",
    "CodeResult",
    "CommandResult",
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
