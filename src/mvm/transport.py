"""How the client reaches mvmd: a small HTTP/1.1 client over its Unix socket (standard
library only), or httpx for a remote `mvmctl serve`.

Why not httpx: importing httpx (with ssl, h11, anyio) costs more than a whole ``mvmctl exec``
round trip; the local socket needs none of it. One connection per request
(``Connection: close``), Content-Length or chunked bodies, streamed lines for exec and logs.
mvmd runs as the same user, but sizes are bounded anyway. ``MVM_URL`` (a remote
``mvmctl serve``) still goes through httpx: see :class:`HttpxTransport`.
"""

from __future__ import annotations

import io
import socket

#: Not ``typing.TYPE_CHECKING``: importing typing (and collections.abc, urllib.parse) costs
#: ``mvmctl exec`` more than the rest of its client side; mypy takes this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType
    from typing import Any

#: Longest status or header line, and most header lines, accepted from mvmd.
MAX_LINE = 64 * 1024
MAX_HEADERS = 100
#: Largest whole body read into memory (a 64 MiB file plus room).
MAX_BODY = 80 << 20
CHUNK = 64 * 1024
#: What ``quote(target, safe=_SAFE)`` leaves as it is: letters, digits, ``_.-~`` and _SAFE.
_SAFE = "/%:@-._~!$&'()*+,;="
_UNQUOTED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~" + _SAFE)


class TransportError(Exception):
    """The connection failed or mvmd answered something that is not HTTP."""


class ConnectFailed(TransportError):
    """Nothing listens on the socket (mvmd not running)."""


class Timeout(TransportError):
    """mvmd did not answer in time."""


class Response:
    """A response: status, lower-cased headers, and a body read whole or streamed."""

    def __init__(
        self,
        sock: socket.socket,
        rf: io.BufferedReader[socket.SocketIO],
        status: int,
        headers: dict[str, str],
    ) -> None:
        self.status_code = status
        self.headers = headers
        self._sock = sock
        self._rf = rf  # buffered (C code): no Python-level buffer juggling per chunk
        self._content: bytes | None = None
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = headers.get("content-length")
        self._chunks = self._chunked() if chunked else self._sized(length)

    # -- raw reading ------------------------------------------------------------------
    def _line(self) -> bytes:
        line = _readline(self._rf)
        if not line.endswith(b"\r\n"):
            raise TransportError("mvmd closed the connection mid-response")
        return line[:-2]

    def _exactly(self, n: int) -> Iterator[bytes]:
        while n > 0:
            part = _io(self._rf.read1, min(n, CHUNK))
            if not part:
                raise TransportError("mvmd closed the connection mid-body")
            n -= len(part)
            yield part

    def _sized(self, length: str | None) -> Iterator[bytes]:
        if length is None:  # until the connection closes
            while part := _io(self._rf.read1, CHUNK):
                yield part
            return
        if not length.isdecimal() or int(length) > MAX_BODY:
            raise TransportError(f"bad Content-Length {length[:20]!r}")
        yield from self._exactly(int(length))

    def _chunked(self) -> Iterator[bytes]:
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise TransportError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailers, then the empty line
                    pass
                return
            yield from self._exactly(size)
            if self._line():
                raise TransportError("chunk not followed by CRLF")

    # -- the interface the client uses --------------------------------------------------
    def iter_bytes(self) -> Iterator[bytes]:
        yield from self._chunks

    def iter_lines(self) -> Iterator[bytes]:
        """Newline-separated lines of the body (without the newline), as they arrive."""
        pieces: list[bytes] = []
        size = 0
        for part in self._chunks:
            start = 0
            while (i := part.find(b"\n", start)) >= 0:
                pieces.append(part[start:i])
                yield b"".join(pieces)
                pieces, size = [], 0
                start = i + 1
            if start < len(part):
                pieces.append(part[start:])
                size += len(part) - start
                if size > MAX_BODY:
                    raise TransportError("mvmd sent an over-long line")
        if pieces:
            yield b"".join(pieces)

    def read(self) -> bytes:
        if self._content is None:
            parts: list[bytes] = []
            total = 0
            for part in self._chunks:
                total += len(part)
                if total > MAX_BODY:
                    raise TransportError("mvmd sent a body over the limit")
                parts.append(part)
            self._content = b"".join(parts)
        return self._content

    @property
    def content(self) -> bytes:
        return self.read()

    @property
    def text(self) -> str:
        return self.read().decode("utf-8", "replace")

    def close(self) -> None:
        self._rf.close()
        self._sock.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class UnixTransport:
    """Requests to ``http://mvmd{base}`` over the Unix socket ``path``."""

    def __init__(self, path: str, base: str, timeout: float, connect_timeout: float) -> None:
        self.path = path
        self.base = base
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def open(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send the request and read the status and headers; the body is left to read."""
        target = self.base + url
        if not _UNQUOTED.issuperset(target):  # else quote() would return it unchanged
            from urllib.parse import quote

            target = quote(target, safe=_SAFE)
        if params:
            from urllib.parse import urlencode

            target += "?" + urlencode({k: str(v) for k, v in params.items()})
        if any(c in target for c in " \r\n\x00"):
            raise TransportError("invalid request target")
        body = content or b""
        head = [f"{method} {target} HTTP/1.1", "Host: mvmd", "Connection: close"]
        for k, v in (headers or {}).items():
            if any(c in k + v for c in "\r\n\x00"):
                raise TransportError(f"invalid header {k[:40]!r}")
            head.append(f"{k}: {v}")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ConnectFailed(str(exc)) from None
            except TimeoutError:
                raise Timeout("connecting to mvmd timed out") from None
            except OSError as exc:
                raise ConnectFailed(str(exc)) from None
            sock.settimeout(self.timeout if timeout is None else timeout)
            try:
                sock.sendall(raw)
            except TimeoutError:
                raise Timeout("mvmd did not take the request in time") from None
            except OSError as exc:
                raise TransportError(str(exc)) from None
            return _read_head(sock)
        except BaseException:
            sock.close()
            raise

    def request(self, method: str, url: str, **kw: Any) -> Response:
        """:meth:`open`, with the whole body read and the connection closed."""
        with self.open(method, url, **kw) as resp:
            resp.read()
        return resp

    def close(self) -> None:
        """Nothing is pooled: each request had its own connection."""


def _io(fn: Callable[[int], bytes], n: int) -> bytes:
    """One read, its errors as this module's."""
    try:
        return fn(n)
    except TimeoutError:
        raise Timeout("mvmd did not answer in time") from None
    except OSError as exc:
        raise TransportError(str(exc)) from None


def _readline(rf: io.BufferedReader[socket.SocketIO]) -> bytes:
    line = _io(rf.readline, MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise TransportError("mvmd sent an over-long line")
    return line


def _read_head(sock: socket.socket) -> Response:
    rf = io.BufferedReader(socket.SocketIO(sock, "rb"), CHUNK)
    status_line = _readline(rf).rstrip(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise TransportError(f"mvmd sent no HTTP status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = _readline(rf)
        if not raw.endswith(b"\r\n"):
            raise TransportError("mvmd closed the connection mid-headers")
        line = raw[:-2]
        if not line:
            break
        key, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise TransportError(f"malformed header line {line[:80]!r}")
        headers[key.strip().lower()] = value.strip()
    else:
        raise TransportError("mvmd sent too many headers")
    return Response(sock, rf, int(parts[1]), headers)


class HttpxResponse:
    """An httpx streamed response with the :class:`Response` interface."""

    def __init__(self, cm: Any, resp: Any) -> None:
        self._cm = cm
        self._resp = resp
        self.status_code: int = resp.status_code
        self.headers: dict[str, str] = dict(resp.headers)

    def iter_lines(self) -> Iterator[bytes]:
        import httpx

        try:
            for line in self._resp.iter_lines():
                yield line.encode()
        except httpx.TimeoutException:
            raise Timeout("the server stopped answering") from None
        except httpx.TransportError as exc:
            raise TransportError(str(exc)) from None

    def read(self) -> bytes:
        import httpx

        try:
            return bytes(self._resp.read())
        except httpx.TimeoutException:
            raise Timeout("the server stopped answering") from None
        except httpx.TransportError as exc:
            raise TransportError(str(exc)) from None

    @property
    def content(self) -> bytes:
        return self.read()

    @property
    def text(self) -> str:
        return self.read().decode("utf-8", "replace")

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> HttpxResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpxTransport:
    """A remote ``mvmctl serve`` (``MVM_URL``): HTTP(S) with a bearer token, through httpx
    (imported only here: TLS needs it, the local socket does not)."""

    def __init__(self, base_url: str, token: str, timeout: float, connect_timeout: float) -> None:
        import httpx

        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
        )
        self.connect_timeout = connect_timeout

    def open(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> HttpxResponse:
        import httpx

        t: Any = (
            httpx.USE_CLIENT_DEFAULT
            if timeout is None
            else httpx.Timeout(timeout, connect=self.connect_timeout)
        )
        cm = self._http.stream(
            method, url, content=content, params=params, headers=headers, timeout=t
        )
        try:
            return HttpxResponse(cm, cm.__enter__())
        except httpx.ConnectError as exc:
            raise ConnectFailed(str(exc)) from None
        except httpx.TimeoutException:
            raise Timeout("the server did not answer in time") from None
        except httpx.InvalidURL as exc:
            raise TransportError(f"cannot build a request from that: {exc}") from None
        except httpx.TransportError as exc:
            raise TransportError(str(exc)) from None

    def request(self, method: str, url: str, **kw: Any) -> HttpxResponse:
        with self.open(method, url, **kw) as resp:
            resp.read()
        return resp

    def close(self) -> None:
        self._http.close()


#: What :meth:`UnixTransport.open` or :meth:`HttpxTransport.open` returns.
AnyResponse = Response | HttpxResponse
