"""Security probes: real QEMU microVMs (and a real mvmd) attacked from the guest side and
from API clients. See docs/security.md for the threat model these tests back.

Every test here is marked ``vm`` like tests/integration; the shared fixtures (a loop
thread, ``call``, ``start_vm``, ``boot_vm``, the default image, a private run directory
checked for leftover QEMUs) come from tests/integration/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures used by the tests here)
    agent,
    boot_vm,
    call,
    image,
    loop_thread,
    run_dir_env,
    run_root,
    shared_vm,
    start_vm,
)

SECURITY_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``vm``."""
    for item in items:
        if SECURITY_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.vm)
