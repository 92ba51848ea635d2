"""Where mvm keeps things on the host. ``MVM_HOME`` overrides the default."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """Root of mvm's data: images, kernels, caches, per-sandbox run dirs."""
    env = os.environ.get("MVM_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("mvm", appauthor=False))


def images_dir() -> Path:
    return home() / "images"


def run_dir() -> Path:
    """Per-VM directories (sockets, console log). Kept short: sockets have a 107-byte limit."""
    env = os.environ.get("MVM_RUN_DIR")
    return Path(env) if env else home() / "run"
