"""Relay one guest connection into the sandbox's egress proxy (run by QEMU, per connection).

QEMU's ``guestfwd=...-cmd:`` starts this program for every connection the guest
opens to the egress address, with that connection on stdin/stdout. It copies bytes
both ways between it and the Unix socket named by its one argument, where mvmd's
egress proxy for that sandbox listens and decides. It holds no policy: a relay
that is not started, or a proxy that is down, just means the guest's connection
closes. Standard library only, run by file path, so it starts fast and imports
nothing from the host's mvm installation.

Usage: ``python3 -I egress_relay.py /path/to/egress.sock``
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

CHUNK = 64 * 1024
#: Seconds with no traffic either way before the relay gives up (the proxy is stricter).
IDLE_TIMEOUT = 600.0
CONNECT_TIMEOUT = 10.0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def relay(guest_in: int, guest_out: int, proxy: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    sel.register(guest_in, selectors.EVENT_READ, "guest")
    sel.register(proxy, selectors.EVENT_READ, "proxy")
    open_sides = 2
    while open_sides:
        events = sel.select(IDLE_TIMEOUT)
        if not events:
            return  # idle for too long
        for key, _ in events:
            if key.data == "guest":
                data = os.read(guest_in, CHUNK)
                if not data:
                    sel.unregister(guest_in)
                    open_sides -= 1
                    try:
                        proxy.shutdown(socket.SHUT_WR)
                    except OSError:
                        return
                else:
                    proxy.sendall(data)
            else:
                data = proxy.recv(CHUNK)
                if not data:
                    return  # the proxy is done: closing ends the guest's connection
                _write_all(guest_out, data)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: egress_relay.py SOCKET", file=sys.stderr)
        return 2
    proxy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proxy.settimeout(CONNECT_TIMEOUT)
    try:
        proxy.connect(argv[1])
    except OSError:
        return 1  # no proxy: the guest sees its connection closed
    proxy.settimeout(None)
    try:
        relay(0, 1, proxy)
    except OSError:
        return 1
    finally:
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
