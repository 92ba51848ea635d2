"""What a dead sandbox leaves behind: why its QEMU ended, and its log kept past the run dir.

A failed sandbox's run dir (sockets, disk-backed RAM) is removed at once, but its log
(console lines, background output, mvmd's notes) is moved to ``$MVM_HOME/postmortem/<id>/``
so ``mvmctl logs NAME`` keeps answering until the sandbox is removed (``down``).
The kept files are the LogBook's own (bounded: MAX_BYTES, rotated once).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

from mvm import paths
from mvm.daemon.logbook import LogBook
from mvm.state import SandboxRecord
from mvm.vm import MicroVM

LOG_NAME = "events.jsonl"


def kept_dir(rec: SandboxRecord) -> Path:
    return paths.home() / "postmortem" / rec.id


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def exit_reason(vm: MicroVM) -> str:
    """'QEMU killed by signal 9 (SIGKILL)', 'QEMU exited with status N', or for a QEMU an
    earlier mvmd started (not our child: no status to collect) that it vanished; then
    whatever QEMU's stderr and the console say."""
    q = vm.qemu
    if q.proc is not None:
        rc = q.proc.poll()
        if rc is None:
            what = "QEMU stopped answering"
        elif rc < 0:
            what = f"QEMU killed by signal {-rc} ({_signal_name(-rc)})"
        else:
            what = f"QEMU exited with status {rc}"
    else:
        what = (
            f"QEMU (pid {q.adopted_pid}, adopted after an mvmd restart) vanished; "
            "its exit status went to the mvmd that started it"
        )
    details = [d for d in (q.stderr_tail(500), _console_summary(vm)) if d]
    return what + (": " + " | ".join(details) if details else "")


def _console_summary(vm: MicroVM) -> str:
    text = vm.failure()
    return "" if text == "no console output" else text


def keep_log(live_book: LogBook | None, rec: SandboxRecord) -> None:
    """Close the sandbox's log and move it out of the run dir (before the run dir goes)."""
    if live_book is not None:
        live_book.close()
    src = Path(rec.run_dir)
    dst = kept_dir(rec)
    for name in (LOG_NAME + ".1", LOG_NAME):
        p = src / name
        if p.exists():
            dst.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.move(str(p), str(dst / name))


def kept_book(rec: SandboxRecord) -> LogBook | None:
    """The kept log of a failed sandbox, closed (readable, never written), or None."""
    path = kept_dir(rec) / LOG_NAME
    if not path.exists():
        return None
    book = LogBook(path)
    book.close()
    return book


def discard(rec: SandboxRecord) -> None:
    """The sandbox is removed: so is its kept log."""
    shutil.rmtree(kept_dir(rec), ignore_errors=True)
