"""Terminal presentation: rich progress for long work, errors with their fix."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from mvm.errors import MvmError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
#: Width of tables when stdout is not a terminal: scripts and pipes get whole cells.
PIPE_WIDTH = 250


def safe_text(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN``: names that come from a guest
    (file names are allowed to hold escapes) must not drive the host's terminal."""
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 else c for c in text
    )


def out_console() -> Console:
    """A console for tables on stdout; never truncates cells when stdout is a pipe."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


class RichReporter:
    """Draws each long step as a progress row with a spinner, status line and elapsed time."""

    def __init__(self, enabled: bool = True) -> None:
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            TextColumn("[dim]{task.fields[status]}[/]"),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
            disable=not enabled,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close_task()
        self.progress.stop()

    def _close_task(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, total=1, completed=1, status="")
            self.progress.stop_task(self.task)
            self.task = None

    def stage(self, title: str, total: int | None = None) -> None:
        self._close_task()
        self.task = self.progress.add_task(title, total=total, status="")

    def advance(self, amount: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)

    def status(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, status=text[:70])

    def finish(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=text)
        self._close_task()


def print_error(exc: MvmError) -> None:
    err_console.print(f"[bold red]mvm:[/] {exc.message}", markup=True, highlight=False)
    if exc.hint:
        err_console.print(f"[yellow]hint:[/] {exc.hint}")


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
