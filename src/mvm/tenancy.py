"""Which sandbox, snapshot and secret names a tenant may see and touch (pure).

A remote tenant's names live in mvmd's one namespace with a prefix derived from the
tenant (``t<10 hex of sha256(tenant)>-``): tenant ``acme``'s sandbox ``web`` is
mvmd's ``t1b2c...-web``. The prefix is a hash, not the tenant text, so it is always
a valid lower-case name part whatever the tenant's spelling; all prefixes have one
length, so no name of one tenant can start with another tenant's prefix. Snapshots belong to a sandbox, so they follow it. Secrets are named the
same way (``mvmctl secret put t1b2c...-KEY``).

Everything here is a pure function of its arguments; the server front
(:mod:`mvm.serve`) applies it to every request, and mvmd can apply the same rule
when it learns the tenant from its trusted Unix socket.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final

from mvm import names
from mvm.errors import InvalidArgument, SandboxNotFound

#: The tenant of the local owner (the Unix socket): no prefix, sees everything.
LOCAL: Final = "default"
PREFIX_LEN: Final = 12  # "t" + 10 hex + "-"


def prefix(tenant: str) -> str:
    """The name prefix of ``tenant`` ("" for the local owner)."""
    names.check("tenant", tenant)
    if tenant == LOCAL:
        return ""
    return "t" + hashlib.sha256(tenant.encode()).hexdigest()[:10] + "-"


def to_service(tenant: str, name: str, kind: names.Kind = "sandbox") -> str:
    """mvmd's name for the tenant's ``name`` (checked: a bad name is InvalidArgument)."""
    names.check(kind, name)
    full = prefix(tenant) + name
    if not names.is_valid(kind, full):
        limit = 63 - len(prefix(tenant))
        raise InvalidArgument(f"{kind} name {name!r} is too long", hint=f"at most {limit} chars")
    return full


def sandbox_for(tenant: str, name: str) -> str:
    """Like :func:`to_service` for a sandbox the caller wants to touch: a name that is not
    valid cannot exist, so it is "not found" (the same answer as another tenant's)."""
    try:
        return to_service(tenant, name)
    except InvalidArgument:
        raise SandboxNotFound(f"sandbox {name} not found", name=name) from None


def owns(tenant: str, service_name: str) -> bool:
    """Whether mvmd's ``service_name`` belongs to ``tenant``."""
    p = prefix(tenant)
    return service_name.startswith(p) and len(service_name) > len(p)


def from_service(tenant: str, service_name: str) -> str:
    """The tenant's own name for one of its mvmd names."""
    if not owns(tenant, service_name):
        raise SandboxNotFound(f"sandbox {service_name} not found")
    return service_name[len(prefix(tenant)) :]


def new_name(tenant: str) -> str:
    """A fresh mvmd name for an unnamed sandbox of ``tenant``."""
    return prefix(tenant) + "sb-" + secrets.token_hex(5)


def unprefix_text(tenant: str, text: str) -> str:
    """``text`` (an error message, say) with the tenant's prefix removed wherever it
    appears, so a tenant sees its own names."""
    p = prefix(tenant)
    return text.replace(p, "") if p else text
