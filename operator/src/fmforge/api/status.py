"""Status helpers shared by the local runner and the operator's reconcilers.

Conditions in metav1.Condition shape with kstatus semantics: `Ready` always; `Reconciling` while
work is under way; `Stalled` when it cannot go on without a change from the user. Pure functions
over wire-form dicts, so they unit-test without anything running.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

#: phase → (Ready, Reconciling, Stalled)
_PHASE_CONDITIONS = {
    "Pending": ("False", "True", "False"),
    "Waiting": ("False", "True", "False"),
    "Running": ("False", "True", "False"),
    "Succeeded": ("True", "False", "False"),
    "Ready": ("True", "False", "False"),
    "Degraded": ("False", "True", "False"),
    "Failed": ("False", "False", "True"),
}


def now() -> str:
    """The current time as metav1.Time (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Return `conditions` with `type_` set; lastTransitionTime moves only when status changes."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != status
    out.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now() if changed else old.get("lastTransitionTime", now()),
            "observedGeneration": generation,
        }
    )
    order = {"Ready": 0, "Reconciling": 1, "Stalled": 2}
    return sorted(out, key=lambda c: order.get(c["type"], 9))


def with_phase(
    status: dict[str, Any], phase: str, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    """`status` moved to `phase`, with Ready/Reconciling/Stalled and observedGeneration to match."""
    ready, reconciling, stalled = _PHASE_CONDITIONS[phase]
    conds = list(status.get("conditions") or [])
    conds = set_condition(conds, "Ready", ready, reason, message, generation)
    conds = set_condition(conds, "Reconciling", reconciling, reason if reconciling == "True" else "Done",
                          message if reconciling == "True" else "", generation)
    conds = set_condition(conds, "Stalled", stalled, reason if stalled == "True" else "NotStalled",
                          message if stalled == "True" else "", generation)
    return {**status, "phase": phase, "message": message, "conditions": conds, "observedGeneration": generation}
