"""Plan mode: what a recorded script would do, and admission's decision for each sandbox.

Pure over an IR plus the facts passed in (policy, known images); printing is the CLI's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mvm.policy import admission
from mvm.sdk import ir as IRm

#: Operations shown one per line (the rest are counted).
MAX_LISTED_OPS = 200


@dataclass(frozen=True)
class SandboxPlanView:
    decl: IRm.SandboxDecl
    plan: admission.SandboxPlan
    decision: admission.Decision


def plan_for(decl: IRm.SandboxDecl, ir: IRm.IR) -> admission.SandboxPlan:
    """The admission plan of one declared sandbox: its create options, the ports its
    operations forward, and every secret name its commands reference."""
    secrets = set(decl.secret_env.values())
    ports: list[tuple[str, int, int, bool]] = []
    for op in ir.operations:
        if op.sandbox != decl.ref:
            continue
        if op.op in ("commands.run", "commands.start"):
            se = op.args.get("secret_env") or {}
            if isinstance(se, dict):
                secrets.update(str(v) for v in se.values())
        elif op.op == "ports.forward":
            ports.append(
                (
                    str(op.args.get("host", "127.0.0.1")),
                    int(op.args.get("host_port", 0)),
                    int(op.args.get("guest_port", 0)),
                    bool(op.args.get("allow_wildcard", False)),
                )
            )
    plan = admission.plan_from_shape(decl, decl.mounts)
    return dataclasses.replace(
        plan, ports=plan.ports + tuple(ports), secrets=tuple(sorted(secrets | set(plan.secrets)))
    )


def decide(ir: IRm.IR, policy: admission.Policy, known_images: list[str]) -> list[SandboxPlanView]:
    out = []
    for decl in ir.sandboxes:
        p = plan_for(decl, ir)
        roots = [decl.include_root] if decl.include_root else []
        out.append(
            SandboxPlanView(
                decl, p, admission.admit(p, policy, known_images=known_images, mount_roots=roots)
            )
        )
    return out


def describe_op(op: IRm.Operation) -> str:
    """One line for an operation: arguments, with blobs as sizes and secrets as names."""
    a = op.args
    where = f"[{op.sandbox}] " if op.sandbox else ""
    if op.op in ("commands.run", "commands.start"):
        env = sorted((a.get("env") or {}).keys())
        sec = a.get("secret_env") or {}
        extra = []
        if env:
            extra.append("env " + ",".join(env))
        if sec:
            extra.append("secrets " + ",".join(f"{k}=secret:{v}" for k, v in sorted(sec.items())))
        if op.op == "commands.run":
            extra.append(f"timeout {a.get('timeout')}s")
        tail = f"  ({'; '.join(extra)})" if extra else ""
        return f"{where}{op.op} {_argv(a.get('argv'))}{tail}"
    if op.op == "files.write":
        data = a.get("data") or {}
        return f"{where}files.write {a.get('path')} ({data.get('size')} bytes)"
    if op.op == "ports.forward":
        return (
            f"{where}ports.forward {a.get('host')}:{a.get('host_port')} -> "
            f"guest:{a.get('guest_port')}"
        )
    shown = {k: v for k, v in a.items() if not isinstance(v, dict)}
    args = " ".join(f"{k}={v}" for k, v in shown.items())
    return f"{where}{op.op} {args}".rstrip()


def _argv(argv: Any) -> str:
    if not isinstance(argv, list):
        return "?"
    import shlex

    return shlex.join(str(x) for x in argv)
