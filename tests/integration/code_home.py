"""The shared fixture of the run_code and MCP tests: a private ``MVM_HOME`` (its own mvmd,
see mvmd_home.py) that the SDK in this process uses for the module's duration."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm.sdk import mode
from tests.integration.mvmd_home import private_home

ENV = ("MVM_HOME", "MVM_RUN_DIR", "MVM_SDK_MODE")


@contextlib.contextmanager
def sdk_home(prefix: str) -> Iterator[Path]:
    """A private home with this process's SDK pointed at it; the environment is restored."""
    with private_home(prefix) as h:
        old = {k: os.environ.get(k) for k in ENV}
        os.environ["MVM_HOME"] = str(h)
        for k in ENV[1:]:
            os.environ.pop(k, None)
        mode._backend = None
        try:
            yield h
        finally:
            mode._backend = None
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def home_fixture(prefix: str) -> Any:
    """A module-scoped ``home`` fixture: ``home = home_fixture("mvcode-")``."""

    @pytest.fixture(scope="module")
    def home() -> Iterator[Path]:
        with sdk_home(prefix) as h:
            yield h

    return home
