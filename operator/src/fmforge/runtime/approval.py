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

from ..api.status import Phase, now, with_phase
from ..api.v1alpha1.modelcard import APPROVED, APPROVED_BY, APPROVED_DIGEST, card_verdict
from .state import StateDir


class ApprovalError(Exception):
    """The card cannot be approved as it stands; the message says why and what to do."""


def approval_annotations(record: dict[str, Any] | None) -> dict[str, str]:
    """The approval recorded by `fmforge approve`, as the annotations a cluster would carry."""
    a = ((record or {}).get("fmforge") or {}).get("approval")
    return {APPROVED_BY: a["by"], APPROVED_DIGEST: a["digest"]} if a else {}


def approve(state: StateDir, name: str, by: str, reviewed: str | None = None) -> dict[str, Any]:
    """Approve the model ModelCard `name` evaluated; the updated record.

    `reviewed` pins the digest the person reviewed (the card they read): the approval is refused
    when the card has evaluated another model since, or when the model's producer has made
    another model than the one the card evaluated (the card must evaluate it first)."""
    record = state.read("ModelCard", name)
    if record is None:
        raise ApprovalError(f"ModelCard/{name} not found in {state.root}; run it first with `fmforge run`")
    status = record.get("status") or {}
    digest = status.get("modelDigest")
    if not digest or not status.get("results"):
        raise ApprovalError(f"ModelCard/{name} has not evaluated a model yet (phase {status.get('phase')}); run it "
                            f"with `fmforge run` first")
    if reviewed is not None and reviewed != digest:
        raise ApprovalError(f"ModelCard/{name} evaluated model {digest}, not the {reviewed} you reviewed: the card "
                            f"has moved on; read its card again and approve with --digest {digest}")
    ref = (record.get("spec") or {}).get("modelRef") or {}
    producer = state.read(ref.get("kind", "TrainingRun"), ref.get("name", ""))
    made = (((producer or {}).get("status") or {}).get("model") or {}).get("digest")
    if made and made != digest:
        raise ApprovalError(f"ModelCard/{name} evaluated model {digest}, but {ref.get('kind', 'TrainingRun')}/"
                            f"{ref.get('name')} has made {made} since; run `fmforge run` so the card evaluates it, "
                            f"then approve that")
    spec_approval = (record.get("spec") or {}).get("approval", "automatic")
    verdict = card_verdict(f"ModelCard/{name}", spec_approval, status["results"], digest,
                           {APPROVED_BY: by, APPROVED_DIGEST: digest})
    if not verdict.approved:  # rejected: a model that misses a threshold is not a person's call
        raise ApprovalError(f"ModelCard/{name}: {verdict.message}; a model that misses its thresholds cannot be "
                            f"approved")
    at = now()
    record.setdefault("fmforge", {})["approval"] = {"by": by, "digest": digest, "at": at}
    status = {**status, "approved": True, "approvedBy": verdict.approved_by}
    msg = f"model {digest} approved by {by}"
    card_uri = (status.get("card") or {}).get("uri") or ""
    if card_uri.startswith("file://"):
        from ..stages.card.render import record_approval

        # The card a reviewer reads says who approved it, not that it waits.
        record_approval(Path(card_uri.removeprefix("file://")).parent, digest, by, at)
    record["status"] = with_phase(status, Phase.SUCCEEDED, APPROVED, msg, record["metadata"].get("generation"))
    state.write(record)
    return record
