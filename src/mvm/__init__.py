"""mvm: microVM sandboxes for untrusted code. The public SDK surface.

``mvm.__all__`` is ``mvm.sdk.__all__`` (one list, re-exported; pinned by
tests/unit/test_exported_members.py). Everything else under ``mvm`` (the daemon, the CLI,
the SDK's submodules) is internal.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.11") as sandbox:  # doctest: +SKIP
...     print(sandbox.commands.run(["python", "-c", "print(1)"]).stdout)
"""

from mvm.sdk import *  # noqa: F403  (the SDK's __all__ is the package's)
from mvm.sdk import __all__ as __all__
