"""mvm: microVM sandboxes for untrusted code. The public SDK surface.

``mvm.__all__`` is ``mvm.sdk.__all__`` (one list, re-exported; pinned by
tests/unit/test_exported_members.py). Everything else under ``mvm`` (the daemon, the CLI,
the SDK's submodules) is internal.

The names are loaded on first use (PEP 562): ``import mvm.cli.main`` or ``mvm.client`` must
not pay for the whole SDK (httpx, the browser and desktop classes) when a command needs none
of it.

>>> import mvm
>>> with mvm.Sandbox.create("python-3.11") as sandbox:  # doctest: +SKIP
...     print(sandbox.commands.run(["python", "-c", "print(1)"]).stdout)
"""

from mvm.sdk import __all__ as __all__

#: Not ``typing.TYPE_CHECKING``: ``import typing`` alone costs ``mvmctl exec`` a quarter of
#: Python's start (every ``mvm.*`` import runs this file); mypy takes this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from mvm.sdk import *  # noqa: F403
del TYPE_CHECKING  # not a public name of mvm


def __getattr__(name: str) -> object:
    if name in __all__:
        import mvm.sdk

        value = getattr(mvm.sdk, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mvm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
