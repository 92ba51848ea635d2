"""The public surface is pinned: adding or removing a name from ``mvm`` is a deliberate
change to this list (as httpx's tests/test_exported_members.py does)."""

import types

import mvm
import mvm.sdk

PUBLIC = [
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


def test_the_exported_names_are_pinned() -> None:
    assert mvm.__all__ == PUBLIC
    assert mvm.sdk.__all__ == PUBLIC


def test_every_exported_name_is_the_sdk_object() -> None:
    for name in PUBLIC:
        assert getattr(mvm, name) is getattr(mvm.sdk, name), name


def test_no_public_name_outside_all() -> None:
    """Every public non-module attribute of ``mvm`` / ``mvm.sdk`` is in ``__all__``
    (submodules are attributes once imported; they are internal, not exported)."""
    for module in (mvm, mvm.sdk):
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        assert public <= set(module.__all__), module.__name__
