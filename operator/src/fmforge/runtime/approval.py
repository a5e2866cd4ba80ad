"""Manual approval of a ModelCard in the local state: `fmforge approve ModelCard/NAME --by WHO`.

The local counterpart of the annotations `fmforge.io/approved-by` and `fmforge.io/approved-digest`
on a cluster. An approval names the digest of the model the card evaluated (status.modelDigest)
and is kept in the record's runner data, where the runner hands it to the ModelCard stage as
those annotations: a re-evaluation of the same model stays approved, a new model waits for a new
approval. The evaluation's card (README.md, card.json) records the approval too. Called by the
CLI; the runner imports `approval_annotations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..api.status import now, with_phase
from ..api.v1alpha1.modelcard import APPROVED_BY, APPROVED_DIGEST, decide_approval
from .state import StateDir

#: Ready's reason while a ModelCard waits for a person.
WAITING_FOR_APPROVAL = "WaitingForApproval"


class ApprovalError(Exception):
    """The card cannot be approved as it stands; the message says why and what to do."""


def approval_annotations(record: dict[str, Any] | None) -> dict[str, str]:
    """The approval recorded by `fmforge approve`, as the annotations a cluster would carry."""
    a = ((record or {}).get("fmforge") or {}).get("approval")
    return {APPROVED_BY: a["by"], APPROVED_DIGEST: a["digest"]} if a else {}


def approve(state: StateDir, name: str, by: str) -> dict[str, Any]:
    """Approve the model ModelCard `name` evaluated; the updated record."""
    record = state.read("ModelCard", name)
    if record is None:
        raise ApprovalError(f"ModelCard/{name} not found in {state.root}; run it first with `fmforge run`")
    status = record.get("status") or {}
    digest = status.get("modelDigest")
    if not digest or not status.get("results"):
        raise ApprovalError(f"ModelCard/{name} has not evaluated a model yet (phase {status.get('phase')}); run it "
                            f"with `fmforge run` first")
    failed = [r["name"] for r in status["results"] if not r.get("passed")]
    if failed:
        raise ApprovalError(f"ModelCard/{name}: model {digest} failed {', '.join(failed)}; a model that misses its "
                            f"thresholds cannot be approved")
    spec_approval = (record.get("spec") or {}).get("approval", "automatic")
    decision = decide_approval(f"ModelCard/{name}", spec_approval, True, digest,
                               {APPROVED_BY: by, APPROVED_DIGEST: digest})
    at = now()
    record.setdefault("fmforge", {})["approval"] = {"by": by, "digest": digest, "at": at}
    status = {**status, "approved": decision.approved, "approvedBy": decision.by}
    msg = f"model {digest} approved by {by}"
    card_uri = (status.get("card") or {}).get("uri") or ""
    if card_uri.startswith("file://"):
        from ..stages.card.render import record_approval

        # The card a reviewer reads says who approved it, not that it waits.
        record_approval(Path(card_uri.removeprefix("file://")).parent, digest, by, at)
    record["status"] = with_phase(status, "Succeeded", "Approved", msg, record["metadata"].get("generation"))
    state.write(record)
    return record
