"""``sandbox.logs()``: the sandbox's console and background-process output, as mvmd keeps
it (bounded, rotated). Secret values are redacted by mvmd before anything leaves it."""

from __future__ import annotations

from collections.abc import Iterator

from mvm.api import models as M
from mvm.errors import InvalidArgument
from mvm.sdk.backend import Backend

LogEvent = M.LogEvent


def logs(
    backend: Backend, key: str, *, follow: bool, redact: bool, since: float | None
) -> Iterator[M.LogEvent]:
    """Events (``message``, ``stream``, ``timestamp``); with ``follow`` it waits for more
    until the caller stops iterating (close the iterator, or break)."""
    if redact is not True:
        raise InvalidArgument(
            "logs(redact=False) is not offered: secret values never leave mvmd",
            hint="call logs() or logs(redact=True)",
        )
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
        raise InvalidArgument(f"since must be a UNIX time in seconds, not {since!r}")
    return backend.logs(key, bool(follow), None if since is None else float(since))
