"""Which backend a process uses: live (the default) or record, chosen by the environment.

``MVM_SDK_MODE=record`` with ``MVM_SDK_RECORD_DIR=DIR`` makes every ``Sandbox`` of the
process record into DIR (``mvmctl compile`` / ``run --mode plan`` set both for the script's
subprocess). The recording is saved when the runner finishes, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

from mvm.errors import InvalidArgument
from mvm.sdk.backend import Backend
from mvm.sdk.live import LiveBackend
from mvm.sdk.record import Recorder

MODE_ENV = "MVM_SDK_MODE"
RECORD_DIR_ENV = "MVM_SDK_RECORD_DIR"
MODES = ("live", "record")

_lock = threading.Lock()
_backend: Backend | None = None
#: The environment the live backend was made for: a process that changes its mvmd
#: (MVM_HOME, MVM_URL...; tests, notebooks, in-process CLI calls) gets a new one, while
#: sandboxes made before keep theirs.
_backend_env: tuple[str | None, ...] = ()
LIVE_ENV = ("MVM_HOME", "MVM_RUN_DIR", "MVM_URL", "MVM_TOKEN", "MVM_ACTOR")


def current_mode() -> str:
    mode = os.environ.get(MODE_ENV, "live") or "live"
    if mode not in MODES:
        raise InvalidArgument(
            f"{MODE_ENV}={mode!r} is not one of {', '.join(MODES)}",
            hint="plan mode is `mvmctl run --mode plan SCRIPT`; it records the script",
        )
    return mode


def backend() -> Backend:
    """The process-wide backend (made on first use)."""
    global _backend, _backend_env
    with _lock:
        env = tuple(os.environ.get(k) for k in LIVE_ENV)
        if isinstance(_backend, LiveBackend) and env != _backend_env:
            _backend = None
        if _backend is None:
            _backend_env = env
            if current_mode() == "record":
                out = os.environ.get(RECORD_DIR_ENV)
                if not out:
                    raise InvalidArgument(f"{MODE_ENV}=record needs {RECORD_DIR_ENV}=DIR")
                rec = Recorder(Path(out), script=sys.argv[0] or None)
                atexit.register(lambda: None if rec.saved else rec.save())
                _backend = rec
            else:
                _backend = LiveBackend()
        return _backend


def recorder() -> Recorder | None:
    """The recorder, if this process records and has made one."""
    with _lock:
        return _backend if isinstance(_backend, Recorder) else None
