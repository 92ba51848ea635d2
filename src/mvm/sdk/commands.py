"""``sandbox.commands``: run a command to its end (``run``) or start one in the background
(``start``, a ``CommandHandle``). argv runs directly (no shell) unless given a string,
which runs under ``sh -c``. Every wait has a default bound."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from mvm.agent import protocol as P
from mvm.api import models as M
from mvm.durations import parse_duration
from mvm.errors import CommandFailed, CommandTimeout, InvalidArgument
from mvm.sdk.backend import Backend, CommandResult
from mvm.sdk.options import EnvValue, split_env
from mvm.sdk.threads import to_thread

#: Default and largest ``timeout_seconds`` of ``run`` and ``handle.wait``.
DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 24 * 3600.0
#: Largest stdin given at start (more goes through ``send_stdin``).
MAX_STDIN = P.MAX_PAYLOAD
MAX_ARGS = 4096
#: How long one poll of a running process waits (the stdout/stderr iterators).
POLL_SECONDS = 0.5


def check_argv(argv: list[str] | tuple[str, ...] | str) -> list[str]:
    if isinstance(argv, str):
        return ["sh", "-c", argv]
    args = list(argv)
    if not args or len(args) > MAX_ARGS:
        raise InvalidArgument(f"a command needs 1 to {MAX_ARGS} arguments")
    for a in args:
        if not isinstance(a, str) or "\0" in a:
            raise InvalidArgument(f"command arguments must be str without NUL bytes, not {a!r}")
    return args


def check_timeout(value: str | float, what: str = "timeout_seconds") -> float:
    seconds = parse_duration(value, what)
    if seconds > MAX_TIMEOUT:
        raise InvalidArgument(f"{what} is at most {MAX_TIMEOUT:g}s", max=MAX_TIMEOUT)
    return seconds


def check_stdin(data: str | bytes) -> bytes:
    body = data.encode() if isinstance(data, str) else bytes(data)
    if len(body) > MAX_STDIN:
        raise InvalidArgument(f"stdin at start is at most {MAX_STDIN} bytes; use send_stdin")
    return body


def finish(result: CommandResult, argv: list[str], timeout: float, check: bool) -> CommandResult:
    """Raise CommandTimeout / CommandFailed (with ``result``) where the caller must know."""
    if result.timed_out:
        exc = CommandTimeout(
            f"{argv[0]} ran past its timeout of {timeout:g}s and was killed",
            hint="raise timeout_seconds=, or make the command faster",
            argv=argv,
            timeout_seconds=timeout,
        )
        exc.result = result  # type: ignore[attr-defined]
        raise exc
    if check and result.exit_code != 0:
        fail = CommandFailed(
            f"{argv[0]} exited with status {result.exit_code}",
            hint="see .result.stderr, or pass check=False to get the result instead",
            argv=argv,
            exit_code=result.exit_code,
        )
        fail.result = result  # type: ignore[attr-defined]
        raise fail
    return result


class Commands:
    def __init__(self, backend: Backend, key: str) -> None:
        self._be = backend
        self._key = key

    def run(
        self,
        argv: list[str] | tuple[str, ...] | str,
        *,
        env: dict[str, EnvValue] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes = b"",
        timeout_seconds: str | float = DEFAULT_TIMEOUT,
        check: bool = False,
        output_limit: int = P.DEFAULT_OUTPUT_LIMIT,
    ) -> CommandResult:
        """Run to the end; the result has exit_code, stdout, stderr, audit_id, truncated.
        CommandTimeout past ``timeout_seconds``; CommandFailed on non-zero only if ``check``."""
        args = check_argv(argv)
        timeout = check_timeout(timeout_seconds)
        plain, secrets = split_env(env)
        if not 0 < output_limit <= P.DEFAULT_OUTPUT_LIMIT:
            raise InvalidArgument(f"output_limit is 1 to {P.DEFAULT_OUTPUT_LIMIT} bytes")
        req = M.ExecRequest(
            argv=args,
            env=plain,
            secret_env=secrets,
            cwd=cwd,
            user=user,
            stdin=check_stdin(stdin),
            timeout=timeout,
            output_limit=output_limit,
        )
        return finish(self._be.run(self._key, req, check), args, timeout, check)

    def start(
        self,
        argv: list[str] | tuple[str, ...] | str,
        *,
        env: dict[str, EnvValue] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes = b"",
        stdin_open: bool = False,
    ) -> CommandHandle:
        """Start in the background and return at once. ``stdin_open=True`` keeps stdin open
        for ``send_stdin``; otherwise the process sees end-of-file after ``stdin``."""
        args = check_argv(argv)
        plain, secrets = split_env(env)
        req = M.ProcStart(
            argv=args,
            env=plain,
            secret_env=secrets,
            cwd=cwd,
            user=user,
            stdin=check_stdin(stdin),
            stdin_open=bool(stdin_open),
        )
        view = self._be.start(self._key, req)
        return CommandHandle(self._be, self._key, view, stdin_open=bool(stdin_open))


class CommandHandle:
    """A background process in the guest: ``pid``, ``wait()``, ``kill()``, ``send_stdin()``,
    and ``stdout``/``stderr`` iterators of byte chunks (from the guest's 1 MiB rings)."""

    def __init__(self, backend: Backend, key: str, view: M.ProcView, *, stdin_open: bool) -> None:
        self._be = backend
        self._key = key
        self.proc = view.proc
        self.pid = view.pid
        self.argv = list(view.argv)
        self.audit_id = view.audit_id
        self._stdin_open = stdin_open

    def __repr__(self) -> str:
        return f"CommandHandle(proc={self.proc}, pid={self.pid}, argv={self.argv!r})"

    def status(self) -> M.ProcView:
        """The process's current view (running, exit_code, ...), without waiting."""
        return self._be.proc_wait(self._key, self.proc, 0.0)

    def wait(self, timeout_seconds: str | float = DEFAULT_TIMEOUT) -> CommandResult:
        """Wait for the end; CommandTimeout (the process keeps running) past the bound."""
        timeout = check_timeout(timeout_seconds)
        be, key = self._be, self._key
        view = be.proc_wait(key, self.proc, timeout)
        if view.running:
            raise CommandTimeout(
                f"process {self.proc} ({self.argv[0]}) still runs after {timeout:g}s",
                hint="wait again, or kill() it",
                proc=self.proc,
                timeout_seconds=timeout,
            )
        out = be.proc_output(key, self.proc, "stdout")
        err = be.proc_output(key, self.proc, "stderr")
        return CommandResult(
            exit_code=view.exit_code if view.exit_code is not None else -1,
            stdout_bytes=bytes(out),
            stderr_bytes=bytes(err),
            audit_id=view.audit_id,
            signal=view.signal,
            duration=(view.ended or view.started) - view.started,
            placeholder=be.recording,
        )

    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` (default SIGKILL) to the process."""
        if isinstance(signal, bool) or not isinstance(signal, int) or not 1 <= signal <= 64:
            raise InvalidArgument(f"signal must be 1..64, not {signal!r}")
        self._be.proc_signal(self._key, self.proc, signal)

    def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        """Write to the process's stdin (needs ``start(..., stdin_open=True)``)."""
        if not self._stdin_open:
            raise InvalidArgument(
                "this process was started without stdin_open=True", proc=self.proc
            )
        body = data.encode() if isinstance(data, str) else bytes(data)
        if len(body) > M.MAX_BODY:
            raise InvalidArgument(f"send_stdin takes at most {M.MAX_BODY >> 20} MiB at once")
        self._be.proc_stdin(self._key, self.proc, body, eof)
        if eof:
            self._stdin_open = False

    def close_stdin(self) -> None:
        self.send_stdin(b"", eof=True)

    @property
    def stdout(self) -> Iterator[bytes]:
        return self._stream("stdout")

    @property
    def stderr(self) -> Iterator[bytes]:
        return self._stream("stderr")

    def _stream(self, stream: str) -> Iterator[bytes]:
        """Chunks as they come, until the process has ended and its output is read."""
        be, key = self._be, self._key
        if be.recording:
            be.proc_output(key, self.proc, stream)
            return
        seen = 0
        while True:
            view = be.proc_wait(key, self.proc, POLL_SECONDS)
            total = view.stdout_bytes if stream == "stdout" else view.stderr_bytes
            if total > seen:
                data = be.proc_output(key, self.proc, stream)
                start = max(0, total - len(data))  # bytes before the ring are gone
                chunk = data[max(0, seen - start) :]
                seen = max(total, start + len(data))
                if chunk:
                    yield bytes(chunk)
            elif not view.running:
                return


class AsyncCommands:
    """``Commands`` for asyncio (each call runs the sync one in a worker thread)."""

    def __init__(self, commands: Commands) -> None:
        self._c = commands

    async def run(self, argv: list[str] | tuple[str, ...] | str, **kw: Any) -> CommandResult:
        return await to_thread(lambda: self._c.run(argv, **kw))

    async def start(self, argv: list[str] | tuple[str, ...] | str, **kw: Any) -> AsyncCommandHandle:
        handle = await to_thread(lambda: self._c.start(argv, **kw))
        return AsyncCommandHandle(handle)


class AsyncCommandHandle:
    def __init__(self, handle: CommandHandle) -> None:
        self.sync = handle
        self.proc = handle.proc
        self.pid = handle.pid
        self.argv = handle.argv

    async def wait(self, timeout_seconds: str | float = DEFAULT_TIMEOUT) -> CommandResult:
        return await to_thread(self.sync.wait, timeout_seconds)

    async def kill(self, signal: int = 9) -> None:
        await to_thread(self.sync.kill, signal)

    async def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        await to_thread(self.sync.send_stdin, data, eof)

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        return aiter_thread(self.sync.stdout)

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return aiter_thread(self.sync.stderr)


_END = object()


async def aiter_thread(it: Iterator[Any]) -> AsyncIterator[Any]:
    """An async iterator pulling each item of a blocking iterator in a worker thread."""
    while True:
        item = await to_thread(next, it, _END)
        if item is _END:
            return
        yield item
