"""What one reconcile decided: children to create, apply or delete, and the status to hold.

Returned by the pure `decide` functions of `jobs` and `deployment`, carried out by `core`.
Also the shared status arithmetic: which status fields the operator owns, and the merge patch
that takes the current status to the decided one (empty when nothing changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api.status import with_phase
from ..kube.client import Resource

#: Status fields the operator writes. Everything else in status (progress, version, model,
#: results…) belongs to the stage, which writes it with a field manager of its own.
COMMON_OWNED = ("phase", "message", "conditions", "observedGeneration")

#: Reasons whose Event is a Warning: something a person should look at.
WARNING_REASONS = {"InvalidSpec", "ReferenceCycle", "ProducerNotFound", "Rejected"}


@dataclass
class Decision:
    """The outcome of a decide function."""

    status: dict[str, Any]
    """The full status after this reconcile (operator-owned fields decided, the rest as read)."""
    owned: tuple[str, ...] = COMMON_OWNED
    """The status fields the operator owns for this kind."""
    create: list[dict[str, Any]] = field(default_factory=list)
    """Children to create, in order; one that exists already is read instead (409 is success)."""
    apply: list[dict[str, Any]] = field(default_factory=list)
    """Children to server-side apply (changed in place)."""
    delete: list[tuple[Resource, str, str]] = field(default_factory=list)
    """(resource, name, why) of children to delete."""
    requeue: bool = True
    """Whether a safety-net resync is due (False once the object is finished for its generation)."""
    permanent: bool = False
    """The object cannot go on without a change from the user (InvalidSpec, a cycle)."""


def phase_status(current: dict[str, Any], phase: str, reason: str, message: str, generation: int,
                 **fields: Any) -> dict[str, Any]:
    """`current` moved to `phase` with the kstatus conditions, plus `fields` (None removes one)."""
    out = with_phase(current, phase, reason, message, generation)
    for k, v in fields.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def status_patch(current: dict[str, Any], decided: dict[str, Any], owned: tuple[str, ...]) -> dict[str, Any]:
    """The JSON merge patch of the owned fields that differ (None deletes a field); {} if none."""
    patch: dict[str, Any] = {}
    for k in owned:
        if current.get(k) != decided.get(k):
            patch[k] = decided.get(k)
    return patch


def reason_of(status: dict[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("reason")
    return None
