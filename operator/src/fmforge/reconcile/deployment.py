"""Deployment: a model served by a KServe InferenceService, gated on an approved ModelCard.

`decide` is pure, like `jobs.decide`: it resolves the model reference, requires (unless
`requireApprovedModelCard: false`) a ModelCard that is Ready, approved, and evaluated exactly
the digest of the model to serve, renders the InferenceService (and, with `expose: route`, an
OpenShift Route to its predictor), applies them only when what we render changed (one spec hash
over both, in an annotation of the InferenceService), and mirrors its `Ready` condition and URL.
The Route has the Deployment as owner, so the garbage collector deletes it with the Deployment;
turning `expose` to none deletes it, which the InferenceService's annotation `fmforge.io/route`
tells (the operator does not watch Routes: most clusters do not serve them). A
Deployment with target edge builds a package, which is a stage: past the same gate,
`jobs.decide` handles it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..api.status import Phase
from ..api.v1alpha1.deployment import KServe
from ..api.v1alpha1.modelcard import Gate, approval_gate
from ..kube import builders
from ..kube.client import ROUTES
from ..kube.settings import Settings
from . import jobs
from .decision import COMMON_OWNED, Decision, phase_status
from .refs import resolve
from .store import World, spec_of

OWNED = COMMON_OWNED + ("url", "servedModel", "inferenceService")
SPEC_HASH = "fmforge.io/spec-hash"
#: On the InferenceService: the name of the Route applied with it, so that a later reconcile
#: knows there is one to delete when `expose` turns to none.
ROUTE = "fmforge.io/route"


def spec_hash(isvc: dict[str, Any], route: dict[str, Any] | None = None) -> str:
    body = {"spec": isvc["spec"], "annotations": isvc["metadata"].get("annotations"),
            "labels": isvc["metadata"].get("labels"), "route": route}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def approved_card(world: World, model_kind: str, model_name: str, digest: str | None) -> Gate:
    """The governance gate over the ModelCards of the model in the store (`approval_gate`, the
    rule the local Deployment stage applies too)."""
    cards = {c["metadata"]["name"]: c for c in world.cards_for(model_kind, model_name)}
    return approval_gate(f"{model_kind}/{model_name}", digest, cards)


def _ready(isvc: dict[str, Any]) -> tuple[bool, str]:
    st = isvc.get("status") or {}
    fresh = st.get("observedGeneration") in (None, isvc["metadata"].get("generation"))
    for c in st.get("conditions") or []:
        if c.get("type") == "Ready":
            if c.get("status") == "True" and fresh:
                return True, ""
            return False, c.get("message") or c.get("reason") or "not ready"
    return False, "KServe has not reported on it yet"


def decide(obj: dict[str, Any], world: World, children: list[dict[str, Any]], settings: Settings) -> Decision:
    """The decision for one Deployment."""
    meta = obj["metadata"]
    gen = int(meta["generation"])
    current = dict(obj.get("status") or {})

    def status(phase: str, reason: str, message: str, **fields: Any) -> dict[str, Any]:
        return phase_status(current, phase, reason, message, gen, **fields)

    try:
        spec = spec_of(obj)
    except ValueError as e:
        msg = f"the spec is invalid: {e}; fix the spec and apply it again"
        return Decision(status(Phase.FAILED, "InvalidSpec", msg), OWNED, requeue=False, permanent=True)
    if spec.target == "kserve" and spec.kserve is None:
        spec = spec.model_copy(update={"kserve": KServe()})

    res = resolve(obj, world)
    if res.cycle:
        msg = f"the references form a cycle: {res.cycle}; fix one of the references"
        return Decision(status(Phase.FAILED, "ReferenceCycle", msg), OWNED, requeue=False, permanent=True)
    if res.waiting:
        reason = "ProducerNotFound" if res.missing else "WaitingForProducer"
        return Decision(status(Phase.WAITING, reason, "waiting for " + "; ".join(res.waiting)), OWNED)
    ref = spec.model_ref
    model = (res.inputs[f"{ref.kind}/{ref.name}"].get("model") or {})
    if not model.get("uri"):
        msg = f"waiting for {ref.kind}/{ref.name} to report its model's URI in status.model"
        return Decision(status(Phase.WAITING, "WaitingForProducer", msg), OWNED)
    digest = model.get("digest")
    card = None
    if spec.require_approved_model_card:
        gate = approved_card(world, ref.kind, ref.name, digest)
        if gate.card is None:
            return Decision(status(Phase.WAITING, gate.reason, gate.message), OWNED)
        card = gate.card
    if spec.target == "edge":
        # An edge package is built by the serving stage, in a RayJob, once the gate is passed; the
        # stage applies the same gate in its pod, so its plan carries the approving card.
        extra = {f"ModelCard/{card}": (world.get("ModelCard", card) or {}).get("status") or {}} if card else {}
        return jobs.decide(obj, world, children, settings, extra_inputs=extra)

    desired = builders.inference_service(obj, spec, model["uri"], digest, settings)
    route = builders.route(obj, spec) if spec.kserve.expose == "route" else None
    name = desired["metadata"]["name"]
    if route is not None:
        desired["metadata"]["annotations"][ROUTE] = route["metadata"]["name"]
    desired["metadata"]["annotations"][SPEC_HASH] = spec_hash(desired, route)
    served = {"uri": model["uri"], "digest": digest, **({"modelCard": card} if card else {})}
    have = next((c for c in children if c["kind"] == "InferenceService" and c["metadata"]["name"] == name), None)
    have_notes = (have or {}).get("metadata", {}).get("annotations") or {}
    applied = have is not None and have_notes.get(SPEC_HASH) == desired["metadata"]["annotations"][SPEC_HASH]
    if not applied:
        gone = have_notes.get(ROUTE)
        delete = [(ROUTES, gone, "expose is no longer route")] if gone and route is None else []
        verb = "updated" if have is not None else "created"
        msg = f"{verb} InferenceService {name} for digest {digest}; waiting for KServe to roll it out"
        return Decision(status(Phase.RUNNING, "Deploying", msg, servedModel=served, inferenceService=name), OWNED,
                        # The Route first: the InferenceService carries the hash of both, so
                        # it is applied only once the Route was.
                        apply=([route] if route else []) + [desired], delete=delete)
    ok, why = _ready(have)
    url = (have.get("status") or {}).get("url")
    if ok:
        return Decision(status(Phase.READY, "Serving", f"InferenceService {name} is serving at {url}", url=url,
                               servedModel=served, inferenceService=name), OWNED)
    phase = Phase.DEGRADED if current.get("phase") in (Phase.READY, Phase.DEGRADED) else Phase.RUNNING
    return Decision(status(phase, "InferenceServiceNotReady", f"InferenceService {name} is not ready: {why}",
                           url=url, servedModel=served, inferenceService=name), OWNED)
