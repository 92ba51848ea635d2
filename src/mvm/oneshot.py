"""``mvmctl run``: one command in a fresh VM that is destroyed afterwards; nothing persists.

An adapter over the sandbox service, in-process: an ephemeral service (its state in a
temporary directory) creates one sandbox, runs the command through the same exec path
as mvmd, and removes it. Admission, secrets, redaction, egress and audit are the
service's, with ``mvmctl`` as the audit actor.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from mvm import paths
from mvm.agent import protocol as P
from mvm.api import models as M
from mvm.errors import CommandTimeout, InvalidArgument, MvmError
from mvm.images.store import ImageStore
from mvm.progress import Reporter
from mvm.service import SandboxService
from mvm.service.imagedefaults import from_build
from mvm.service.live import ACTOR
from mvm.state import StateDB

#: Default command timeout for ``run`` (seconds). A timeout always applies.
DEFAULT_TIMEOUT = 300.0
#: Exit status when the command ran past its timeout (as with timeout(1)).
TIMEOUT_EXIT = 124


@dataclass
class RunResult:
    sandbox_id: str
    image: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float
    boot_seconds: float
    timed_out: bool
    truncated_stdout: bool
    truncated_stderr: bool
    signal: int | None = None
    #: Audit id of the ``cmd.exec.finished`` record of this run.
    audit_id: str | None = None
    image_id: str = ""
    #: Wall-clock start (before boot) and end of the run (Unix seconds).
    started_at: float = 0.0
    finished_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stdout"] = self.stdout.decode(errors="replace")
        d["stderr"] = self.stderr.decode(errors="replace")
        d["truncated"] = {"stdout": self.truncated_stdout, "stderr": self.truncated_stderr}
        del d["truncated_stdout"], d["truncated_stderr"]
        return d


async def run_once(
    argv: list[str],
    *,
    image: str = "python",
    cpus: int = 1,
    memory_mb: int = 512,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    stdin: bytes = b"",
    output_limit: int = P.DEFAULT_OUTPUT_LIMIT,
    on_output: M.OutputSink | None = None,
    store: ImageStore | None = None,
    reporter: Reporter | None = None,
    secret_env: Mapping[str, str] | None = None,
    network: M.NetworkSpec | None = None,
) -> RunResult:
    """``secret_env`` maps ENV -> secret name: resolved by the service before boot,
    injected into this one command, every value redacted from its output. ``network``
    other than preset ``none`` gives the VM a NIC whose only way out is the egress proxy
    the service serves (in this process) for the run."""
    store = store or ImageStore()
    img = store.ensure(image, reporter)  # build with progress shown, before anything else
    if not argv and not from_build(img.build).argv:  # refused before anything boots
        raise InvalidArgument(f"no command given, and image {image!r} records no CMD")
    started_at = time.time()
    actor = ACTOR.set("mvmctl")
    try:
        with tempfile.TemporaryDirectory(prefix="run-", dir=_state_parent()) as tmp:
            db = StateDB(Path(tmp) / "state.db")
            service = SandboxService(db, store)
            try:
                create = M.CreateSandbox(
                    image=image,
                    cpus=cpus,
                    memory_mb=memory_mb,
                    ttl_seconds=timeout,
                    env=dict(env or {}),
                    # Resolved before boot (an unknown name fails first), given to the command.
                    secret_env=dict(secret_env or {}),
                    network=network or M.NetworkSpec(),
                )
                live = await service.sandboxes.create(create)
                try:
                    return await _run(
                        service, live.name, live.rec.id, live.rec.image, live.rec.image_id,
                        live.vm.boot_seconds if live.vm else 0.0, started_at,
                        M.ExecRequest(
                            argv=argv, cwd=cwd, user=user, stdin=stdin, timeout=timeout,
                            output_limit=output_limit,
                        ),
                        on_output,
                    )  # fmt: skip
                finally:
                    with contextlib.suppress(MvmError):
                        await service.sandboxes.down(live.name, reason="oneshot")
            finally:
                await service.close()
                db.close()
    finally:
        ACTOR.reset(actor)


async def _run(
    service: SandboxService,
    name: str,
    sandbox_id: str,
    image: str,
    image_id: str,
    boot_seconds: float,
    started_at: float,
    req: M.ExecRequest,
    on_output: M.OutputSink | None,
) -> RunResult:
    try:
        r = await service.execs.run(name, req, on_output)
    except CommandTimeout:
        # The guest did not even report its own timeout: the VM is destroyed on exit.
        r = M.ExecResult(exit_code=TIMEOUT_EXIT, timed_out=True, duration=req.timeout)
    facts = msgspec.structs.asdict(r)  # the one exec result, plus what the run adds
    facts["exit_code"] = TIMEOUT_EXIT if r.timed_out else r.exit_code
    return RunResult(
        **facts,
        sandbox_id=sandbox_id,
        image=image,
        image_id=image_id,
        boot_seconds=boot_seconds,
        started_at=started_at,
        finished_at=time.time(),
    )


def _state_parent() -> Path:
    """Where a run keeps its ephemeral service state (beside the VMs' run directories)."""
    d = paths.run_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d
