"""``mvmctl exec NAME -- COMMAND`` without click, msgspec or the client: the hot path.

``mvmctl exec`` should cost little more than Python's start and one exec request to mvmd
(issue 12). Importing click, msgspec and the API models costs several times Python's own
start, so :func:`main` (the entry point) hands a plain exec to :func:`try_exec` first. It
takes the command line only when it is one it fully understands, with the same meaning
click gives it (the known options, NAME, COMMAND; tests/unit/test_cli_fastexec.py compares
the two on many command lines), and everything on it is valid by the same rules the full
path checks (name, sizes, NULs, UTF-8). Anything else (``--help``, ``--json``, a secret in
``-e``, a bad value, an unknown option, ``MVM_URL``, a socket not ours) returns ``False``
before any side effect, and the click command runs as before and gives its own help,
errors and messages.

The request and the answer are the full path's: the same JSON fields (defaults left to
mvmd, which decodes them the same), the same exec event stream, decoded with ``json`` for
the three events it carries normally (output and exit); anything unusual in it (an error
event, an unexpected field type) goes to the client's own decoder and error mapping
(imported then). Errors print as ``fail_on_errors`` prints them, through it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's (its import costs this path); mypy takes it as true
if TYPE_CHECKING:
    from mvm.transport import Response

#: exec's flags and the options that take a value, by click's destination names.
FLAGS = {"-i": "interactive", "--interactive": "interactive", "--detach": "detach"}
VALUED = {"-e": "env", "--env": "env", "--cwd": "cwd", "--user": "user", "--timeout": "timeout"}
LONG_VALUED = ("--env", "--cwd", "--user", "--timeout")
#: ``--timeout``'s default (click's ``default="300s"``), in seconds.
DEFAULT_TIMEOUT = ("300s", 300.0)
#: Sandbox names: ``names.LOWER_RE`` as sets (no ``re`` import).
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_REST = _FIRST | frozenset("._-")
#: Actors (``client._ACTOR_RE``), likewise.
_ACTOR_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ") | _FIRST
_ACTOR_REST = _ACTOR_FIRST | frozenset("_.:@-")
#: Larger commands take the full path (its size checks name the limits); this much can
#: not reach them: 12 bytes of JSON per character at most, against 512 KiB.
FAST_COMMAND_CHARS = 16 * 1024
#: Largest stdin ``exec -i`` sends (1 MiB, as in mvm.cli.execute).
MAX_STDIN = 1 << 20
HTTP_TIMEOUT = 120.0  # mvm.client.HTTP_TIMEOUT
CONNECT_TIMEOUT = 5.0
EXEC_TIMEOUT_EXIT = 124


def parse(args: list[str]) -> dict[str, object] | None:
    """``exec``'s parameters as click would give them, or None for a command line this
    does not take (then click parses it: help, errors, unusual spellings)."""
    params: dict[str, object] = {
        "interactive": False,
        "detach": False,
        "env": (),
        "cwd": None,
        "user": None,
        "timeout": DEFAULT_TIMEOUT[0],
    }
    envs: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional += args[i:]
            break
        if arg[:1] != "-" or arg == "-":
            positional.append(arg)
            continue
        if arg in FLAGS:
            params[FLAGS[arg]] = True
            continue
        key, eq, value = arg.partition("=")
        if eq and key in LONG_VALUED:
            dest = VALUED[key]
        elif arg in VALUED and i < len(args):
            dest, value = VALUED[arg], args[i]
            i += 1
            if value[:1] == "-":  # click would take it; leave such spellings to click
                return None
        else:
            return None  # --help, --json, -ie, -eK=V, unknown: click's
        if dest == "env":
            envs.append(value)
        else:
            params[dest] = value
    if len(positional) < 2:
        return None
    params["name"] = positional[0]
    params["command"] = tuple(positional[1:])
    params["env"] = tuple(envs)
    return params


def valid_name(name: str) -> bool:
    """``names.is_valid("sandbox", name)``."""
    return 0 < len(name) <= 63 and name[0] in _FIRST and _REST.issuperset(name)


def socket_path() -> str | None:
    """``str(mvm.client.socket_path())`` for the usual homes, or None (unusual spelling)."""
    home = os.environ.get("MVM_HOME")
    if not home:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        user = os.environ.get("HOME", "")
        if xdg.startswith("/"):
            home = xdg + "/mvm"
        elif user.startswith("/"):
            home = user + "/.local/share/mvm"
        else:
            return None
    home = home.rstrip("/") if home != "/" else home
    if not home or "//" in home or "/./" in home or home.endswith("/.") or home[:2] == "./":
        return None  # pathlib would normalise it: leave it to the full path
    if home == ".":
        return None
    return ("" if home == "/" else home) + "/mvmd.sock"


def _utf8(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates (undecodable argv): the full path's
        return False
    return True


def plan(args: list[str]) -> tuple[str, str, dict[str, object], dict[str, str]] | None:
    """(socket, sandbox name, request body, headers) for a plain exec, or None."""
    if os.environ.get("_MVMCTL_COMPLETE") or os.environ.get("MVM_URL", "").strip():
        return None
    p = parse(args)
    if p is None:
        return None
    name = p["name"]
    command = p["command"]
    cwd, user, timeout_text = p["cwd"], p["user"], p["timeout"]
    env_pairs = p["env"]
    assert isinstance(name, str) and isinstance(command, tuple) and isinstance(env_pairs, tuple)
    assert isinstance(timeout_text, str)
    if not valid_name(name):
        return None
    env: dict[str, str] = {}
    for pair in env_pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k or v.startswith("secret:"):
            return None
        env[k] = v
    texts = [*command, *(f"{k}={v}" for k, v in env.items())]
    texts += [t for t in (cwd, user) if isinstance(t, str)]
    if sum(map(len, texts)) > FAST_COMMAND_CHARS or not all(map(_utf8, texts)):
        return None
    if timeout_text == DEFAULT_TIMEOUT[0]:
        timeout = DEFAULT_TIMEOUT[1]
    else:
        from mvm.durations import parse_duration
        from mvm.errors import MvmError

        try:
            timeout = parse_duration(timeout_text, "timeout")
        except MvmError:
            return None
    headers = {"content-type": "application/json"}
    actor = os.environ.get("MVM_ACTOR", "").strip()
    if actor:
        if len(actor) > 64 or actor[0] not in _ACTOR_FIRST or not _ACTOR_REST.issuperset(actor):
            return None
        headers["X-Mvm-Actor"] = actor
    sock = socket_path()
    if sock is None:
        return None
    try:
        if os.stat(sock).st_uid != os.geteuid():
            return None  # the full path refuses it, with its message
    except FileNotFoundError:
        pass  # mvmd not running: started below, as the full path does
    except OSError:
        return None
    body: dict[str, object] = {"argv": list(command), "timeout": timeout}
    if env:
        body["env"] = env
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = user
    if p["detach"]:
        body["detach"] = True
    if p["interactive"]:
        body["stdin"] = None  # read when it runs: no side effect while deciding
    return sock, name, body, headers


def try_exec(args: list[str]) -> bool:
    """Run ``mvmctl exec`` here if ``args`` (after ``exec``) is a plain one (then exit with
    the command's status); False to leave it to click."""
    planned = plan(args)
    if planned is None:
        return False
    try:
        code = _run(*planned)
    except KeyboardInterrupt:
        from mvm.cli.common import warn

        warn("[red]interrupted[/]")
        sys.exit(130)
    except BrokenPipeError:  # as click: quiet, status 1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:  # mvm.errors (and typing) only imported when something failed
        from mvm.errors import MvmError

        if not isinstance(exc, MvmError):
            raise
        from mvm.cli.common import report

        report(exc, False)
    sys.exit(code)


def _run(sock: str, name: str, body: dict[str, object], headers: dict[str, str]) -> int:
    import json

    from mvm import transport as tp

    if "stdin" in body:
        data = sys.stdin.buffer.read(MAX_STDIN + 1)
        if len(data) > MAX_STDIN:
            from mvm.errors import InvalidArgument

            raise InvalidArgument("stdin is larger than 1 MiB", hint="copy it in with `mvmctl cp`")
        import binascii

        body["stdin"] = binascii.b2a_base64(data, newline=False).decode()
    timeout = body["timeout"]
    assert isinstance(timeout, float)
    http = tp.UnixTransport(sock, "/v1", HTTP_TIMEOUT, CONNECT_TIMEOUT)
    content = json.dumps(body, separators=(",", ":")).encode()
    path = f"/sandboxes/{name}/exec"
    try:
        try:
            resp = http.open("POST", path, content=content, headers=headers, timeout=timeout + 60)
        except tp.ConnectFailed:  # nothing sent: start mvmd as the full path does, once
            from mvm.client import Client

            Client().ensure_daemon()
            resp = http.open("POST", path, content=content, headers=headers, timeout=timeout + 60)
        with resp:
            if resp.status_code >= 400:
                from mvm.client import _raise_for

                _raise_for(resp)
            end = _stream(resp)
    except tp.Timeout:
        from mvm.errors import CommandTimeout

        raise CommandTimeout("mvmd stopped answering during exec") from None
    except tp.TransportError as exc:
        from mvm.errors import MvmError

        raise MvmError(f"lost the connection to mvmd: {exc}") from None
    if end is None:
        from mvm.errors import MvmError

        raise MvmError("the exec stream ended without an exit event")
    code, timed_out = end
    if timed_out:
        from mvm.cli.common import warn

        warn(f"[bold red]mvm:[/] command timed out after {timeout:g}s")
        return EXEC_TIMEOUT_EXIT
    return code or 0


def _stream(resp: Response) -> tuple[int, bool] | None:
    """Write output events as they come; (exit code, timed out) of the exit event."""
    end: tuple[int, bool] | None = None
    for line in resp.iter_lines():
        if not line:
            continue
        ev = _plain(line)
        if ev is None:  # unusual: the client's decoder and error mapping say what it is
            ev = _slow_event(line)
            if ev is None:
                continue
        kind, data, code, timed_out = ev
        if kind == "exit":
            end = (-1 if code is None else code, timed_out)
        elif data:
            stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
            stream.write(data)
            stream.flush()
    return end


#: ``M.ExecEvent``'s fields besides ``type`` and ``data``, with the JSON types msgspec takes.
_FIELDS: dict[str, tuple[type, ...]] = {
    "exit_code": (int, type(None)),
    "timed_out": (bool,),
    "signal": (int, type(None)),
    "duration": (float, int),
    "truncated_stdout": (bool,),
    "truncated_stderr": (bool,),
    "audit_id": (str, type(None)),
}
Event = tuple[str, bytes, "int | None", bool]


def _plain(line: bytes) -> Event | None:
    """(type, data, exit_code, timed_out) of a well-formed output or exit event, else None
    (then :func:`_slow_event` decides)."""
    import binascii
    import json

    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("type") not in ("stdout", "stderr", "exit"):
        return None
    for key, value in ev.items():
        if key in ("type", "data"):
            continue
        types = _FIELDS.get(key)
        if types is None or type(value) not in types:  # bool is not an int here
            return None
    data = ev.get("data", "")
    if not isinstance(data, str):
        return None
    try:
        raw = binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except (ValueError, UnicodeEncodeError):
        return None
    return ev["type"], raw, ev.get("exit_code"), ev.get("timed_out", False)


def _slow_event(line: bytes) -> Event | None:
    """An event :func:`_plain` did not take, as ``Client.exec_stream`` + ``gather_exec``
    treat it: malformed -> MvmError, error -> its class, unknown types ignored."""
    import msgspec

    from mvm import errors
    from mvm.api import models as M
    from mvm.client import error_from_body

    try:
        event = msgspec.json.decode(line, type=M.ExecEvent)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise errors.MvmError(f"mvmd sent a malformed exec event: {line[:200]!r}") from None
    if event.type == "error":
        if event.error is not None:
            raise error_from_body(event.error)
        M.ExecGatherer(keep=False).feed(event)  # raises what gather_exec raises
    if event.type not in ("stdout", "stderr", "exit"):
        return None
    return event.type, event.data, event.exit_code, event.timed_out
