"""The one rule for every name a caller gives mvm, in one place.

Names travel in URL paths, file paths under ``$MVM_HOME`` and audit records, so each
kind has a strict pattern: no ``/``, no ``..`` as a whole name, no control characters,
no ``?``/``#``/``%``. The client checks a name before it builds a URL and the server
checks it again before it looks anything up; both call :func:`check`.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from mvm.errors import InvalidArgument

Kind = Literal["sandbox", "snapshot", "image", "secret", "forward", "token", "tenant"]

#: Lower-case DNS-label-like names: sandboxes, snapshots and images.
LOWER_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: Mixed-case names (secrets, tenants, token ids): what the stores already accept.
MIXED_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Forward ids as mvmd makes them.
FORWARD_RE: Final = re.compile(r"^fw-[0-9a-f]{8}$")

_RULES: Final[dict[str, tuple[re.Pattern[str], str]]] = {
    "sandbox": (
        LOWER_RE,
        "lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)",
    ),
    "snapshot": (
        LOWER_RE,
        "lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)",
    ),
    "image": (
        LOWER_RE,
        "lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)",
    ),
    "secret": (
        MIXED_RE,
        "letters, digits, '.', '_' and '-' (max 64, starting with a letter or digit)",
    ),
    "tenant": (
        MIXED_RE,
        "letters, digits, '.', '_' and '-' (max 64, starting with a letter or digit)",
    ),
    "token": (
        MIXED_RE,
        "letters, digits, '.', '_' and '-' (max 64, starting with a letter or digit)",
    ),
    "forward": (FORWARD_RE, "an id as printed by `mvmctl forward --list` (fw- and 8 hex digits)"),
}


def is_valid(kind: Kind, name: object) -> bool:
    """True when ``name`` is a string that follows the rule of ``kind``."""
    pattern, _ = _RULES[kind]
    return isinstance(name, str) and pattern.fullmatch(name) is not None


def check(kind: Kind, name: object) -> str:
    """Return ``name`` if it follows the rule of ``kind``, else raise ``InvalidArgument``
    naming the rule (the name is shown escaped: it may hold control characters)."""
    if is_valid(kind, name):
        assert isinstance(name, str)
        return name
    _, rule = _RULES[kind]
    shown = repr(name)[:80]
    raise InvalidArgument(f"invalid {kind} name {shown}", hint=f"use {rule}", kind=kind)
