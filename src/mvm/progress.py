"""Progress reporting seam: library code reports, the CLI draws (rich), tests stay quiet."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def stage(self, title: str, total: int | None = None) -> None:
        """A new long step starts (``total`` units of work if known)."""

    def advance(self, amount: int = 1) -> None:
        """``amount`` units of the current step are done."""

    def status(self, text: str) -> None:
        """A line of detail about the current step."""

    def finish(self, text: str) -> None:
        """The current step ended."""


class NullReporter:
    def stage(self, title: str, total: int | None = None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def finish(self, text: str) -> None:
        pass
