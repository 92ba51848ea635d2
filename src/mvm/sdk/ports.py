"""``sandbox.ports``: TCP forwards from a host port to a guest port. They bind 127.0.0.1
unless told otherwise, and a wildcard address (0.0.0.0, ::) needs ``allow_wildcard=True``."""

from __future__ import annotations

import ipaddress

from mvm.api import models as M
from mvm.errors import InvalidArgument, PolicyDenied
from mvm.sdk.backend import Backend
from mvm.sdk.threads import to_thread


def is_wildcard(host: str) -> bool:
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_spec(guest_port: int, host_port: int, host: str, allow_wildcard: bool) -> M.PortSpec:
    for what, port, lo in (("guest_port", guest_port, 1), ("host_port", host_port, 0)):
        if isinstance(port, bool) or not isinstance(port, int) or not lo <= port <= 65535:
            raise InvalidArgument(f"{what} must be {lo}..65535, not {port!r}")
    if not isinstance(host, str) or len(host) > 255:
        raise InvalidArgument(f"invalid host {host!r}")
    if is_wildcard(host) and not allow_wildcard:
        raise PolicyDenied(
            f"forwarding on the wildcard address {host!r} exposes the guest to the network",
            hint="bind 127.0.0.1 (the default), or pass allow_wildcard=True if you mean it",
            host=host,
        )
    return M.PortSpec(
        guest_port=guest_port, host_port=host_port, host=host, allow_wildcard=allow_wildcard
    )


class Forward:
    """One live forward; ``close()`` removes it."""

    def __init__(self, backend: Backend, key: str, info: M.ForwardInfo) -> None:
        self._be = backend
        self._key = key
        self.id = info.id
        self.host = info.host
        self.host_port = info.host_port
        self.guest_port = info.guest_port
        self.audit_id = info.audit_id

    def __repr__(self) -> str:
        return f"Forward({self.host}:{self.host_port} -> guest:{self.guest_port})"

    def close(self) -> None:
        self._be.unforward(self._key, self.id)

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ports:
    def __init__(self, backend: Backend, key: str) -> None:
        self._be = backend
        self._key = key

    def forward(
        self,
        guest_port: int,
        host_port: int = 0,
        host: str = "127.0.0.1",
        allow_wildcard: bool = False,
    ) -> Forward:
        """Forward ``host:host_port`` (0: any free port) to the guest's ``guest_port``."""
        spec = check_spec(guest_port, host_port, host, allow_wildcard)
        return Forward(self._be, self._key, self._be.forward(self._key, spec))


class AsyncPorts:
    def __init__(self, ports: Ports) -> None:
        self._p = ports

    async def forward(
        self,
        guest_port: int,
        host_port: int = 0,
        host: str = "127.0.0.1",
        allow_wildcard: bool = False,
    ) -> Forward:
        return await to_thread(self._p.forward, guest_port, host_port, host, allow_wildcard)
