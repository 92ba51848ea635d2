"""The policy gate: every mutating verb asks it, it asks admission, and it audits the answer.

One policy source (``admission.PolicySource``: one file, re-read when it changes) for
every verb; a denial is audited as ``policy.denied`` naming the verb and its rules and
raised as ``PolicyDenied`` naming them too.
"""

from __future__ import annotations

from typing import Any

from mvm.policy import admission
from mvm.service.live import audit_after, audit_before


class Gate:
    def __init__(self, source: admission.PolicySource | None = None) -> None:
        self.source = source or admission.PolicySource()

    def policy(self) -> admission.Policy:
        return self.source.current()

    def enforce(
        self, verb: str, sandbox: str | None, decision: admission.Decision, **fields: Any
    ) -> None:
        """Raise PolicyDenied (audited) unless ``decision`` allows ``verb``."""
        if decision.allowed:
            return
        audit_after(
            "policy.denied",
            sandbox,
            verb=verb,
            rules=[d.rule for d in decision.denials],
            denials=[d.message for d in decision.denials],
            **fields,
        )
        raise admission.denied_error(decision, verb)

    def launch(self, name: str, plan: admission.SandboxPlan) -> admission.Decision:
        """Create (or recreate from a snapshot): the whole plan; audited either way (the
        ``plan.admitted`` record is written before anything boots, failing closed)."""
        decision = admission.admit(plan, self.policy())
        fields: dict[str, Any] = {
            "image": plan.image,
            "rules": [d.rule for d in decision.denials],
            "denials": [d.message for d in decision.denials],
            "notes": list(decision.notes),
            "secrets": list(plan.secrets),
        }
        if not decision.allowed:
            audit_after("plan.denied", name, **fields)
            raise admission.denied_error(decision)
        audit_before("plan.admitted", name, **fields)  # fail closed
        return decision

    def forward(self, sandbox: str, port: tuple[str, int, int, bool], existing: int) -> None:
        self.enforce(
            "forward",
            sandbox,
            admission.admit_forward(port, existing, self.policy()),
            host=port[0],
            guest_port=port[2],
        )

    def ttl(self, sandbox: str, ttl_seconds: float) -> None:
        self.enforce("set-ttl", sandbox, admission.admit_ttl(ttl_seconds, self.policy()))

    def exec(self, sandbox: str, secrets: list[str], user: str | None) -> None:
        self.enforce(
            "exec",
            sandbox,
            admission.admit_exec(secrets, user, self.policy()),
            secrets=sorted(set(secrets)),
            user=user,
        )

    def uploads(self, sandbox: str, paths: list[str]) -> None:
        self.enforce(
            "upload", sandbox, admission.admit_uploads(paths, self.policy()), paths=len(paths)
        )
