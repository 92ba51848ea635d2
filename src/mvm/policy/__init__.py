"""Policy: the pure admission decision every launch goes through (see ``admission``)."""

from mvm.policy.admission import (
    Decision,
    Denial,
    Policy,
    SandboxPlan,
    admit,
    load_policy,
    plan_from_create,
)

__all__ = [
    "Decision",
    "Denial",
    "Policy",
    "SandboxPlan",
    "admit",
    "load_policy",
    "plan_from_create",
]
