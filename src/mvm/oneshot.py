"""``mvmctl run``: one command in a fresh VM that is destroyed afterwards; nothing persists."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mvm import audit, paths, redact
from mvm.agent import protocol as P
from mvm.agent.client import OutputCallback
from mvm.api.models import NetworkSpec
from mvm.audit import runs as audit_runs
from mvm.daemon.egress import EgressProxy, policy_for, proxy_env
from mvm.errors import CommandTimeout
from mvm.images.store import ImageStore
from mvm.policy import admission
from mvm.policy.network import Policy as NetPolicy
from mvm.progress import Reporter
from mvm.secrets import SecretStore
from mvm.vm import MicroVM, VMSpec, new_id

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
    on_output: OutputCallback | None = None,
    store: ImageStore | None = None,
    reporter: Reporter | None = None,
    secret_env: Mapping[str, str] | None = None,
    network: NetworkSpec | None = None,
) -> RunResult:
    """``secret_env`` maps ENV -> secret name: resolved from the store before boot, injected
    into this one command, and every value is redacted from its output. ``network`` other
    than preset ``none`` gives the VM a NIC whose only way out is an egress proxy that this
    process serves for the run (the same proxy mvmd runs per sandbox)."""
    refs = dict(secret_env or {})
    net = network or NetworkSpec()
    netpolicy = await policy_for(net.preset, list(net.allow))  # bad presets/patterns fail here
    plan = admission.SandboxPlan(
        image=image,
        cpus=cpus,
        memory_mb=memory_mb,
        ttl_seconds=timeout,
        network_preset=net.preset,
        network_allow=tuple(net.allow),
        secrets=tuple(sorted(set(refs.values()))),
    )
    decision = admission.admit(plan, admission.load_policy())
    verdict: dict[str, Any] = {"image": image, "rules": [d.rule for d in decision.denials]}
    if not decision.allowed:
        audit.record("plan.denied", actor="mvmctl", **verdict)
        raise admission.denied_error(decision)
    audit.record("plan.admitted", actor="mvmctl", **verdict)
    secret_values = SecretStore().resolve(refs)  # unknown names fail before boot
    by_name = {refs[k]: v for k, v in secret_values.items()}
    redact.known.add(by_name)
    redactor = redact.Redactor(by_name)
    streams = {"stdout": redactor.stream(), "stderr": redactor.stream()}
    user_output = on_output
    if user_output is not None and redactor:

        def on_output(stream: str, data: bytes) -> None:
            clean = streams[stream].feed(data) if stream in streams else redactor.redact_bytes(data)
            if clean:
                user_output(stream, clean)

    store = store or ImageStore()
    img = store.ensure(image, reporter)
    started_at = time.time()
    vm_id = new_id()
    spec = VMSpec(img, cpus=cpus, memory_mb=memory_mb, network=netpolicy.enabled)
    async with (
        serve_egress(vm_id, netpolicy),
        await MicroVM.boot(spec, store=store, vm_id=vm_id) as vm,
    ):
        agent = vm.require_agent()
        full_env = {
            **img.env,
            **(proxy_env() if netpolicy.enabled else {}),
            **(env or {}),
            **secret_values,
        }
        audit_runs.started(
            vm.id,
            argv,
            image=img.name,
            image_id=img.id,
            env_keys=list(full_env),
            cpus=cpus,
            memory_mb=memory_mb,
            timeout=timeout,
            user=user,
            cwd=cwd,
            stdin=stdin,
            boot_seconds=vm.boot_seconds,
            network=net.preset,
            network_allow=list(net.allow),
        )
        try:
            r = await agent.exec(
                argv,
                env=full_env,
                cwd=cwd,
                user=user,
                stdin=stdin,
                timeout=timeout,
                output_limit=output_limit,
                on_output=on_output,
            )
        except CommandTimeout:
            # The guest did not even report its own timeout: the VM is destroyed on exit.
            aid = audit_runs.finished(
                vm.id,
                exit_code=TIMEOUT_EXIT,
                timed_out=True,
                signal=None,
                duration=timeout,
                stdout=b"",
                stderr=b"",
                truncated_stdout=False,
                truncated_stderr=False,
            )
            return RunResult(
                vm.id,
                img.name,
                TIMEOUT_EXIT,
                b"",
                b"",
                timeout,
                vm.boot_seconds,
                True,
                False,
                False,
                audit_id=aid,
                image_id=img.id,
                started_at=started_at,
                finished_at=time.time(),
            )
        if redactor:
            if user_output is not None:
                for name, sr in streams.items():
                    tail = sr.flush()
                    if tail:
                        user_output(name, tail)
            r.stdout = redactor.redact_bytes(r.stdout)
            r.stderr = redactor.redact_bytes(r.stderr)
        code = TIMEOUT_EXIT if r.timed_out else r.exit_code
        aid = audit_runs.finished(
            vm.id,
            exit_code=code,
            timed_out=r.timed_out,
            signal=r.signal,
            duration=r.duration,
            stdout=r.stdout,
            stderr=r.stderr,
            truncated_stdout=r.truncated_stdout,
            truncated_stderr=r.truncated_stderr,
        )
        return RunResult(
            sandbox_id=vm.id,
            image=img.name,
            exit_code=code,
            stdout=r.stdout,
            stderr=r.stderr,
            duration=r.duration,
            boot_seconds=vm.boot_seconds,
            timed_out=r.timed_out,
            truncated_stdout=r.truncated_stdout,
            truncated_stderr=r.truncated_stderr,
            signal=r.signal,
            audit_id=aid,
            image_id=img.id,
            started_at=started_at,
            finished_at=time.time(),
        )


@contextlib.asynccontextmanager
async def serve_egress(vm_id: str, policy: NetPolicy) -> AsyncIterator[None]:
    """For a VM with a network: its egress proxy, served by this process for the run."""
    if not policy.enabled:
        yield
        return
    proxy = EgressProxy(vm_id, policy, paths.run_dir() / vm_id / "egress.sock")
    await proxy.start()
    try:
        yield
    finally:
        await proxy.close()
