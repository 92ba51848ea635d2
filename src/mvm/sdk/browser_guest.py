"""Runs IN THE GUEST (``python3 -I -c <this file>``): one screenshot over CDP, PNG on stdout.

Stdlib only (the guest has no websocket library). It opens a fresh tab on the warm
Chromium's loopback DevTools port, navigates it (if given a URL), waits for the load event
(bounded), captures a PNG and closes the tab. Taken inside the guest so the bytes come out
through an audited exec (hash and size only). Exit codes: 0 PNG written; 3 navigation
refused or failed (the reason on stderr); 4 CDP unreachable or broken.

argv: [url or "", "full" or "view", load timeout seconds]
"""

import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.request
from typing import Any

PORT = 9222
#: The viewport of a screenshot (``full_page`` keeps the width, takes the page's height).
WIDTH, HEIGHT = 1280, 720
MAX_MSG = 64 << 20


class WS:
    """A minimal RFC 6455 client: masked text frames out, (fragmented) text frames in."""

    def __init__(self, path: str, timeout: float) -> None:
        self.s = socket.create_connection(("127.0.0.1", PORT), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.s.recv(4096)
            if not chunk or len(head) > 65536:
                raise OSError("websocket handshake failed")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise OSError(
                "websocket refused: " + head.split(b"\r\n", 1)[0].decode(errors="replace")
            )
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise OSError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, method: str, **params: object) -> int:
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        n = len(data)
        head = bytes([0x81])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        return self.next_id

    def recv(self) -> dict[str, Any]:
        msg = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            if n + len(msg) > MAX_MSG:
                raise OSError("websocket message too large")
            payload = self._read(n)
            op = b0 & 0x0F
            if op == 8:
                raise OSError("websocket closed by the browser")
            if op in (0, 1, 2):
                msg += payload
                if b0 & 0x80:
                    m = json.loads(msg)
                    return m if isinstance(m, dict) else {}

    def call(self, method: str, deadline: float, **params: object) -> dict[str, Any]:
        want = self.send(method, **params)
        while True:
            self.s.settimeout(max(0.1, deadline - time.monotonic()))
            m = self.recv()
            if m.get("id") == want:
                if "error" in m:
                    raise OSError(f"{method}: {m['error'].get('message')}")
                r = m.get("result", {})
                return r if isinstance(r, dict) else {}
            self.events.append(m)

    def wait_event(self, method: str, deadline: float) -> None:
        """Until ``method`` has been seen (already, or now), bounded by ``deadline``."""
        while not any(e.get("method") == method for e in self.events):
            self.s.settimeout(max(0.1, deadline - time.monotonic()))
            m = self.recv()
            if "method" in m:
                self.events.append(m)


def http(method: str, path: str, timeout: float) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return json.loads(opener.open(req, timeout=timeout).read(1 << 20))


def main() -> int:
    url, mode, load_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    try:
        # A new tab starts a renderer process: tens of seconds under TCG on a loaded host
        # (10 s was seen to be too short), so both steps get the load's own bound.
        target = http("PUT", "/json/new?about:blank", load_timeout)
        ws = WS(f"/devtools/page/{target['id']}", load_timeout)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cdp: {exc}", file=sys.stderr)
        return 4
    deadline = time.monotonic() + load_timeout
    try:
        ws.call("Page.enable", deadline)
        ws.call("Network.enable", deadline)
        ws.call(
            "Emulation.setDeviceMetricsOverride",
            deadline,
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        if url:
            nav = ws.call("Page.navigate", deadline, url=url)
            if nav.get("errorText"):
                print(f"navigation to {url} failed: {nav['errorText']}", file=sys.stderr)
                return 3
            ws.wait_event("Page.loadEventFired", deadline)
            for e in ws.events:
                p = e.get("params", {})
                if e.get("method") != "Network.responseReceived" or p.get("type") != "Document":
                    continue
                headers = {
                    str(k).lower(): v for k, v in p.get("response", {}).get("headers", {}).items()
                }
                if p.get("loaderId") == nav.get("loaderId") and "x-mvm-egress" in headers:
                    status = p["response"].get("status")
                    print(
                        f"navigation to {url} refused by the sandbox's egress proxy ({status})",
                        file=sys.stderr,
                    )
                    return 3
        params: dict[str, Any] = {"format": "png"}
        if mode == "full":
            size = ws.call("Page.getLayoutMetrics", deadline)["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        shot = ws.call("Page.captureScreenshot", deadline, **params)
        sys.stdout.buffer.write(base64.b64decode(shot["data"]))
        return 0
    except TimeoutError:
        print(f"page {url} did not load within {load_timeout:g}s", file=sys.stderr)
        return 3
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cdp: {exc}", file=sys.stderr)
        return 4
    finally:
        try:
            http("PUT", f"/json/close/{target['id']}", 10)
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
