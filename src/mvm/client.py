"""A client of mvmd (HTTP over the daemon's Unix socket, :mod:`mvm.transport`), starting the
daemon if needed.

Used by the CLI and the SDK. Errors come back from the daemon as JSON
``ErrorBody`` objects and are raised here as the same ``mvm.errors`` classes.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec

from mvm import errors, names, paths
from mvm import transport as tp
from mvm.agent import protocol as P
from mvm.api import models as M
from mvm.api.fork import ForkRequest, ForkResult, RestoreAs

T = TypeVar("T")

#: Seconds to wait for an auto-started daemon to answer.
DAEMON_START_TIMEOUT = 15.0
#: Default HTTP timeout for calls that do not run commands.
HTTP_TIMEOUT = 120.0
#: Seconds a followed log may stay silent (mvmd sends nothing while nothing happens).
LOGS_TIMEOUT = 7 * 86400.0


def seg(kind: names.Kind, name: str) -> str:
    """A checked, quoted URL path segment for a caller-given name.

    Checked by the one rule (so ``x/../victim`` or ``p2?x=1`` never becomes another
    request), then quoted anyway, so a path segment can never carry ``/``, ``?`` or ``#``.
    """
    return quote(names.check(kind, name), safe="")


def num(value: int) -> str:
    """A URL path segment for a number (a process id): an int, never a string."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.InvalidArgument(f"invalid process id {value!r}")
    return str(value)


def check_command(argv: list[str], env: dict[str, str], cwd: str | None) -> None:
    """Refuse a command the guest agent could not take (sizes, NULs) before anything is
    sent, with the limit named (the agent's own check stays: this is only the early one)."""
    try:
        P.command_spec(argv, env, cwd)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc), limit=P.MAX_SPEC) from None


#: Who the owner's calls act as in mvmd's audit records (``X-Mvm-Actor``): set for a block
#: by :func:`acting_as`, else ``Client(actor=)``, else ``MVM_ACTOR``; unset: ``mvmd``.
ACTOR_ENV = "MVM_ACTOR"
ACTOR_HEADER = "X-Mvm-Actor"
_ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")
_acting_as: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mvm_client_actor", default=None
)


def check_actor(actor: str) -> str:
    if not _ACTOR_RE.fullmatch(actor):
        raise errors.InvalidArgument(
            f"invalid actor {actor[:80]!r}", hint="letters, digits, '_', '.', ':', '@', '-' (64)"
        )
    return actor


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Calls made inside (this thread or task, and threads it starts with
    ``asyncio.to_thread``) are audited by mvmd with ``actor`` as actor."""
    token = _acting_as.set(check_actor(actor))
    try:
        yield
    finally:
        _acting_as.reset(token)


def socket_path() -> Path:
    return paths.home() / "mvmd.sock"


def remote_url() -> str | None:
    """``MVM_URL`` (an `mvmctl serve` to talk to instead of the local socket), if set."""
    url = os.environ.get("MVM_URL", "").strip().rstrip("/")
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise errors.InvalidArgument(f"MVM_URL {url!r} must start with http:// or https://")
    return url


def remote_token() -> str:
    token = os.environ.get("MVM_TOKEN", "").strip()
    if not token:
        raise errors.InvalidArgument(
            "MVM_URL is set but MVM_TOKEN is not", hint="create one with `mvmctl token create`"
        )
    return token


def _raise_for(resp: tp.AnyResponse) -> None:
    if resp.status_code < 400:
        return
    try:
        body = msgspec.json.decode(resp.read(), type=M.ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise errors.MvmError(f"mvmd answered HTTP {resp.status_code}: {resp.text[:500]}") from None
    raise error_from_body(body)


def error_from_body(body: M.ErrorBody) -> errors.MvmError:
    return errors.from_name(body.error, body.message, body.hint, dict(body.data))


def check_socket_owner(path: Path) -> None:
    """Refuse a daemon socket that belongs to another user (it could be anyone's daemon)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise errors.HostError(
            f"the mvmd socket {path} belongs to uid {st.st_uid}, not to you",
            hint="use your own MVM_HOME, or ask its owner",
            socket=str(path),
        )


def bounded_wait(timeout: float) -> float:
    """A wait's timeout, at most the longest TTL (what mvmd waits at most, too): a longer
    one could not pass, and would overflow the socket's own timeout."""
    return min(max(float(timeout), 0.0), M.MAX_TTL)


class Client:
    def __init__(
        self, *, autostart: bool = True, timeout: float = HTTP_TIMEOUT, actor: str | None = None
    ) -> None:
        self.socket = socket_path()
        self.autostart = autostart
        self.remote = remote_url()
        label = actor or os.environ.get(ACTOR_ENV, "").strip()
        self.actor = check_actor(label) if label else None
        self._http: tp.UnixTransport | tp.HttpxTransport
        if self.remote is not None:
            # MVM_URL + MVM_TOKEN: a remote `mvmctl serve`, same API over HTTP(S).
            self.autostart = False
            self._http = tp.HttpxTransport(
                f"{self.remote}/{M.API_VERSION}", remote_token(), timeout, 10.0
            )
        else:
            check_socket_owner(self.socket)
            self._http = tp.UnixTransport(str(self.socket), f"/{M.API_VERSION}", timeout, 5.0)
        self._ensured = False

    def _label(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus the actor of this call for mvmd's audit (the owner's socket
        only: over TCP the token is the actor)."""
        actor = _acting_as.get() or self.actor
        if actor is not None and self.remote is None:
            headers[ACTOR_HEADER] = actor
        return headers

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- daemon ---------------------------------------------------------------------
    def ping(self) -> M.DaemonStatus | None:
        try:
            resp = self._http.request("GET", "/status", timeout=5.0)
        except tp.TransportError:
            return None
        _raise_for(resp)
        return msgspec.json.decode(resp.content, type=M.DaemonStatus)

    def ensure_daemon(self) -> None:
        if self._ensured:
            return
        if self.ping() is None:
            if self.remote is not None:
                raise errors.MvmError(
                    f"no mvm server answers at {self.remote}", hint="is `mvmctl serve` running?"
                )
            if not self.autostart:
                raise errors.MvmError(
                    "mvmd is not running", hint="start it with `mvmctl daemon start`"
                )
            start_daemon()
            deadline = time.monotonic() + DAEMON_START_TIMEOUT
            while self.ping() is None:
                if time.monotonic() > deadline:
                    log = paths.home() / "mvmd.log"
                    raise errors.MvmError(
                        f"mvmd did not start within {DAEMON_START_TIMEOUT:.0f}s",
                        hint=f"see {log}",
                    )
                time.sleep(0.05)
        self._ensured = True

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tp.AnyResponse:
        self.ensure_daemon()
        body = msgspec.json.encode(json) if json is not None else content
        headers = {"content-type": "application/json"} if json is not None else {}
        try:
            resp = self._http.request(
                method,
                url,
                content=body,
                params=params,
                headers=self._label(headers),
                timeout=timeout,
            )
        except tp.Timeout:
            raise errors.CommandTimeout(f"mvmd did not answer {method} {url} in time") from None
        except tp.TransportError as exc:
            raise errors.MvmError(f"lost the connection to mvmd: {exc}") from None
        _raise_for(resp)
        return resp

    def _get(self, url: str, typ: type[T], **kw: Any) -> T:
        return msgspec.json.decode(self.request("GET", url, **kw).content, type=typ)

    def _post(self, url: str, typ: type[T], json: Any = None, **kw: Any) -> T:
        return msgspec.json.decode(self.request("POST", url, json=json, **kw).content, type=typ)

    def status(self) -> M.DaemonStatus:
        return self._get("/status", M.DaemonStatus)

    def shutdown(self) -> None:
        self.request("POST", "/shutdown")

    # -- sandboxes ------------------------------------------------------------------
    def create(self, req: M.CreateSandbox) -> M.SandboxInfo:
        if req.name is not None:
            names.check("sandbox", req.name)
        return self._post("/sandboxes", M.SandboxInfo, req, timeout=600.0)

    def list_sandboxes(self) -> list[M.SandboxInfo]:
        return self._get("/sandboxes", list[M.SandboxInfo])

    def get(self, name: str) -> M.SandboxInfo:
        return self._get(f"/sandboxes/{seg('sandbox', name)}", M.SandboxInfo)

    def down(self, name: str) -> M.SandboxInfo:
        resp = self.request("DELETE", f"/sandboxes/{seg('sandbox', name)}", timeout=60.0)
        return msgspec.json.decode(resp.content, type=M.SandboxInfo)

    def pause(self, name: str) -> M.SandboxInfo:
        return self._post(f"/sandboxes/{seg('sandbox', name)}/pause", M.SandboxInfo)

    def resume(self, name: str) -> M.SandboxInfo:
        return self._post(f"/sandboxes/{seg('sandbox', name)}/resume", M.SandboxInfo)

    def set_ttl(self, name: str, ttl_seconds: float) -> M.SandboxInfo:
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/ttl",
            M.SandboxInfo,
            M.TtlRequest(ttl_seconds=ttl_seconds),
        )

    def note_call(self, via: str, call: str, sandbox: str | None = None) -> M.Noted:
        """Have mvmd audit this client's own call (e.g. an MCP tool), on ``sandbox``."""
        path = f"/sandboxes/{seg('sandbox', sandbox)}/calls" if sandbox else "/calls"
        return self._post(path, M.Noted, M.CallNote(via=via, call=call))

    def wait(self, name: str, timeout: float) -> M.SandboxInfo:
        timeout = bounded_wait(timeout)
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/wait",
            M.SandboxInfo,
            params={"timeout": timeout},
            timeout=timeout + 30.0,
        )

    # -- exec -----------------------------------------------------------------------
    def exec_stream(self, name: str, req: M.ExecRequest) -> Iterator[M.ExecEvent]:
        """Yield output events as they come, then the ``exit`` event."""
        check_command(req.argv, req.env, req.cwd)
        path = f"/sandboxes/{seg('sandbox', name)}/exec"
        self.ensure_daemon()
        decoder = msgspec.json.Decoder(M.ExecEvent)
        try:
            with self._http.open(
                "POST",
                path,
                content=msgspec.json.encode(req),
                headers=self._label({"content-type": "application/json"}),
                timeout=req.timeout + 60.0,
            ) as resp:
                _raise_for(resp)
                for line in resp.iter_lines():
                    if not line:
                        continue
                    try:
                        event = decoder.decode(line)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        raise errors.MvmError(
                            f"mvmd sent a malformed exec event: {line[:200]!r}"
                        ) from None
                    if event.type == "error" and event.error is not None:
                        raise error_from_body(event.error)
                    yield event
        except tp.Timeout:
            raise errors.CommandTimeout("mvmd stopped answering during exec") from None
        except tp.TransportError as exc:
            raise errors.MvmError(f"lost the connection to mvmd: {exc}") from None

    # -- files ----------------------------------------------------------------------
    def read_file(self, name: str, path: str) -> bytes:
        return self.request(
            "GET", f"/sandboxes/{seg('sandbox', name)}/files", params={"path": path}
        ).content

    def write_file(self, name: str, path: str, data: bytes, mode: int = 0o644) -> M.FileStat:
        resp = self.request(
            "PUT",
            f"/sandboxes/{seg('sandbox', name)}/files",
            params={"path": path, "mode": mode},
            content=data,
        )
        return msgspec.json.decode(resp.content, type=M.FileStat)

    def list_dir(self, name: str, path: str) -> list[M.FileEntry]:
        return self._get(
            f"/sandboxes/{seg('sandbox', name)}/files/list",
            list[M.FileEntry],
            params={"path": path},
        )

    def stat(self, name: str, path: str) -> M.FileStat:
        return self._get(
            f"/sandboxes/{seg('sandbox', name)}/files/stat", M.FileStat, params={"path": path}
        )

    def mkdir(self, name: str, path: str, parents: bool = False) -> None:
        self.request(
            "POST",
            f"/sandboxes/{seg('sandbox', name)}/files/mkdir",
            params={"path": path, "parents": int(parents)},
        )

    def remove(self, name: str, path: str, recursive: bool = False) -> None:
        self.request(
            "DELETE",
            f"/sandboxes/{seg('sandbox', name)}/files",
            params={"path": path, "recursive": int(recursive)},
        )

    def move(self, name: str, src: str, dest: str) -> None:
        self.request(
            "POST",
            f"/sandboxes/{seg('sandbox', name)}/files/move",
            params={"path": src, "dest": dest},
        )

    # -- processes ------------------------------------------------------------------
    def proc_start(self, name: str, req: M.ProcStart) -> M.ProcView:
        check_command(req.argv, req.env, req.cwd)
        return self._post(f"/sandboxes/{seg('sandbox', name)}/procs", M.ProcView, req)

    def proc_list(self, name: str) -> list[M.ProcView]:
        return self._get(f"/sandboxes/{seg('sandbox', name)}/procs", list[M.ProcView])

    def proc_wait(self, name: str, proc: int, timeout: float) -> M.ProcView:
        timeout = bounded_wait(timeout)
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/procs/{num(proc)}/wait",
            M.ProcView,
            params={"timeout": timeout},
            timeout=timeout + 30.0,
        )

    def proc_signal(self, name: str, proc: int, signal: int) -> M.ProcView:
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/procs/{num(proc)}/signal",
            M.ProcView,
            params={"signal": signal},
        )

    def proc_stdin(self, name: str, proc: int, data: bytes, eof: bool = False) -> None:
        self.request(
            "POST",
            f"/sandboxes/{seg('sandbox', name)}/procs/{num(proc)}/stdin",
            params={"eof": int(eof)},
            content=data,
        )

    def proc_output(self, name: str, proc: int, stream: str) -> bytes:
        return self.request(
            "GET",
            f"/sandboxes/{seg('sandbox', name)}/procs/{num(proc)}/output",
            params={"stream": stream},
        ).content

    # -- port forwards ---------------------------------------------------------------
    def forward(self, name: str, spec: M.PortSpec) -> M.ForwardInfo:
        """Forward ``spec.host:spec.host_port`` to ``spec.guest_port`` in the sandbox."""
        return self._post(f"/sandboxes/{seg('sandbox', name)}/forwards", M.ForwardInfo, spec)

    def forwards(self, name: str) -> list[M.ForwardInfo]:
        return self._get(f"/sandboxes/{seg('sandbox', name)}/forwards", list[M.ForwardInfo])

    def unforward(self, name: str, forward_id: str) -> M.ForwardInfo:
        resp = self.request(
            "DELETE", f"/sandboxes/{seg('sandbox', name)}/forwards/{seg('forward', forward_id)}"
        )
        return msgspec.json.decode(resp.content, type=M.ForwardInfo)

    # -- logs -----------------------------------------------------------------------
    def logs(
        self, name: str, *, follow: bool = False, since: float | None = None
    ) -> Iterator[M.LogEvent]:
        self.ensure_daemon()
        params: dict[str, Any] = {"follow": int(follow)}
        if since is not None:
            params["since"] = since
        decoder = msgspec.json.Decoder(M.LogEvent)
        try:
            with self._http.open(
                "GET",
                f"/sandboxes/{seg('sandbox', name)}/logs",
                params=params,
                timeout=LOGS_TIMEOUT,
            ) as resp:
                _raise_for(resp)
                for line in resp.iter_lines():
                    if not line:
                        continue
                    try:
                        event = decoder.decode(line)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        raise errors.MvmError(
                            f"mvmd sent a malformed log event: {line[:200]!r}"
                        ) from None
                    yield event
        except tp.TransportError as exc:
            raise errors.MvmError(f"lost the connection to mvmd: {exc}") from None

    # -- snapshots ------------------------------------------------------------------
    def snapshot_save(self, name: str, snap: str) -> M.SnapshotInfo:
        names.check("snapshot", snap)
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/snapshots",
            M.SnapshotInfo,
            M.SnapshotRequest(name=snap),
            timeout=600.0,
        )

    def snapshot_list(self, name: str) -> list[M.SnapshotInfo]:
        return self._get(f"/sandboxes/{seg('sandbox', name)}/snapshots", list[M.SnapshotInfo])

    def snapshot_restore(self, name: str, snap: str) -> M.SandboxInfo:
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/snapshots/{seg('snapshot', snap)}/restore",
            M.SandboxInfo,
            timeout=600.0,
        )

    def snapshot_remove(self, name: str, snap: str) -> None:
        self.request(
            "DELETE", f"/sandboxes/{seg('sandbox', name)}/snapshots/{seg('snapshot', snap)}"
        )

    # -- fork -------------------------------------------------------------------------
    def fork(self, name: str, new: str, count: int = 1) -> ForkResult:
        """Children of running sandbox ``name``: ``new`` or ``new-1`` .. ``new-N``."""
        req = ForkRequest(name=new, count=count)
        return self._post(f"/sandboxes/{seg('sandbox', name)}/fork", ForkResult, req, timeout=600.0)

    def snapshot_restore_as(self, name: str, snap: str, new: str) -> M.SandboxInfo:
        """Snapshot ``snap`` of ``name`` started as a new sandbox ``new``."""
        return self._post(
            f"/sandboxes/{seg('sandbox', name)}/snapshots/{seg('snapshot', snap)}/restore-as",
            M.SandboxInfo,
            RestoreAs(name=new),
            timeout=600.0,
        )


def start_daemon() -> None:
    """Start mvmd detached (its own session), logging to $MVM_HOME/mvmd.log."""
    home = paths.home()
    home.mkdir(parents=True, exist_ok=True)
    with (home / "mvmd.log").open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "mvm.daemon"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
