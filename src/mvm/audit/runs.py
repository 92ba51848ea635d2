"""Audit records and receipts for one-shot runs (``mvmctl run``, no daemon).

The one-shot path writes the same event names as mvmd, with actor ``mvmctl`` and
the VM id as the sandbox, so one log tells the whole story.
"""

from __future__ import annotations

from typing import Any

from mvm.audit import keys, receipt
from mvm.audit.encoding import argv_sha256, sha256_hex
from mvm.audit.log import audit_dir, default_log, tenant

ACTOR = "mvmctl"


def started(
    vm_id: str,
    argv: list[str],
    *,
    image: str,
    image_id: str,
    env_keys: list[str],
    cpus: int,
    memory_mb: int,
    timeout: float,
    user: str | None,
    cwd: str | None,
    stdin: bytes,
    boot_seconds: float,
    network: str = "none",
    network_allow: list[str] | None = None,
) -> str:
    """Record launch + exec start *before* the command runs (fails closed)."""
    log = default_log()
    log.append(
        "sandbox.launched",
        actor=ACTOR,
        sandbox=vm_id,
        id=vm_id,
        image=image,
        image_id=image_id,
        cpus=cpus,
        memory_mb=memory_mb,
        network=network,
        network_allow=list(network_allow or []),
        oneshot=True,
        boot_seconds=round(boot_seconds, 3),
    )
    return log.append(
        "cmd.exec.started",
        actor=ACTOR,
        sandbox=vm_id,
        argv_sha256=argv_sha256(argv),
        argc=len(argv),
        env_keys=sorted(env_keys),
        cwd=cwd,
        user=user,
        timeout=timeout,
        stdin_bytes=len(stdin),
        stdin_sha256=sha256_hex(stdin),
    )


def outputs(stdout: bytes, stderr: bytes) -> dict[str, dict[str, Any]]:
    return {
        "stdout": {"sha256": sha256_hex(stdout), "bytes": len(stdout)},
        "stderr": {"sha256": sha256_hex(stderr), "bytes": len(stderr)},
    }


def finished(
    vm_id: str,
    *,
    exit_code: int,
    timed_out: bool,
    signal: int | None,
    duration: float,
    stdout: bytes,
    stderr: bytes,
    truncated_stdout: bool,
    truncated_stderr: bool,
) -> str:
    """Record the exec's end and the VM's destruction; return the exec record's id."""
    log = default_log()
    out = outputs(stdout, stderr)
    aid = log.append(
        "cmd.exec.finished",
        actor=ACTOR,
        sandbox=vm_id,
        exit_code=exit_code,
        timed_out=timed_out,
        signal=signal,
        duration=round(duration, 6),
        truncated_stdout=truncated_stdout,
        truncated_stderr=truncated_stderr,
        stdout_sha256=out["stdout"]["sha256"],
        stdout_bytes=out["stdout"]["bytes"],
        stderr_sha256=out["stderr"]["sha256"],
        stderr_bytes=out["stderr"]["bytes"],
    )
    log.append("sandbox.stopped", actor=ACTOR, sandbox=vm_id, id=vm_id, reason="oneshot")
    return aid


def make_receipt(
    *,
    argv: list[str],
    env_keys: list[str],
    image: dict[str, Any],
    policy: dict[str, Any],
    exit_code: int,
    stdout: bytes,
    stderr: bytes,
    timings: dict[str, Any],
    audit_id: str | None,
    sandbox_id: str | None,
) -> dict[str, Any]:
    """A receipt signed by this host's audit key."""
    body = receipt.build(
        argv_sha256=argv_sha256(argv),
        argc=len(argv),
        env_keys=env_keys,
        image=image,
        policy=policy,
        exit_code=exit_code,
        outputs=outputs(stdout, stderr),
        timings=timings,
        audit_id=audit_id,
        tenant=tenant(),
        sandbox_id=sandbox_id,
    )
    return receipt.sign(body, keys.load_or_create(audit_dir()))
