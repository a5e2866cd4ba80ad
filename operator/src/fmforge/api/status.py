"""Status helpers shared by the local runner and the operator's reconcilers.

Conditions in metav1.Condition shape with kstatus semantics: `Ready` always; `Reconciling` while
work is under way; `Stalled` when it cannot go on without a change from the user. Pure functions
over wire-form dicts, so they unit-test without anything running.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """Where an object is. A StrEnum: its members are the strings the status holds."""

    PENDING = "Pending"
    """Accepted; nothing started yet (a RayJob created, its cluster starting)."""
    WAITING = "Waiting"
    """Waiting for something outside it: a producer, an approval."""
    RUNNING = "Running"
    """Its work is under way."""
    SUCCEEDED = "Succeeded"
    """Its work is done for this generation (a pile, a model, an approved card, an edge package)."""
    READY = "Ready"
    """Serving (a Deployment whose InferenceService is ready)."""
    DEGRADED = "Degraded"
    """Was serving, and is not now."""
    FAILED = "Failed"
    """Cannot go on without a change (a bad input, a rejected model, a failed job)."""


#: Phases in which an object's output can be used by its readers.
DONE = frozenset({Phase.SUCCEEDED, Phase.READY})
#: Phases in which a stage's attempt has ended, for good or not.
FINISHED = frozenset({Phase.SUCCEEDED, Phase.FAILED})

#: phase → (Ready, Reconciling, Stalled)
_PHASE_CONDITIONS = {
    Phase.PENDING: ("False", "True", "False"),
    Phase.WAITING: ("False", "True", "False"),
    Phase.RUNNING: ("False", "True", "False"),
    Phase.SUCCEEDED: ("True", "False", "False"),
    Phase.READY: ("True", "False", "False"),
    Phase.DEGRADED: ("False", "True", "False"),
    Phase.FAILED: ("False", "False", "True"),
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


def is_done(status: dict[str, Any] | None, generation: int | None = None) -> bool:
    """Whether `status` says its object's output is usable: a done phase, for `generation` when
    one is given (a status of an older generation says nothing about the current spec)."""
    st = status or {}
    if st.get("phase") not in DONE:
        return False
    return generation is None or st.get("observedGeneration") == generation


def with_phase(
    status: dict[str, Any], phase: str, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    """`status` moved to `phase`, with Ready/Reconciling/Stalled and observedGeneration to match."""
    phase = Phase(phase)  # a ValueError here is a bug: a phase no CRD allows
    ready, reconciling, stalled = _PHASE_CONDITIONS[phase]
    conds = list(status.get("conditions") or [])
    conds = set_condition(conds, "Ready", ready, reason, message, generation)
    conds = set_condition(conds, "Reconciling", reconciling, reason if reconciling == "True" else "Done",
                          message if reconciling == "True" else "", generation)
    conds = set_condition(conds, "Stalled", stalled, reason if stalled == "True" else "NotStalled",
                          message if stalled == "True" else "", generation)
    # The plain string: YAML's safe dumper and the API server want `str`, not a subclass of it.
    return {**status, "phase": phase.value, "message": message, "conditions": conds, "observedGeneration": generation}
