"""DataPile, TrainingRun, ModelCard, TunedModel (and an edge Deployment): a stage run as a RayJob.

`decide` is level-based and pure: from the object, its namespace's fmforge objects and its
children, it returns the children to create (the plan ConfigMap, then the RayJob of the
current generation), the RayJobs of older generations to stop, and the status, which mirrors
the RayJob (`jobDeploymentStatus`, `jobStatus`, `reason`, `message`) and, once the job has ended,
the stage's own outcome (`status.outcome`, written by the stage from its pod): a stage that
refused its input ends Failed with the stage's reason and message, not a generic job failure. A
ModelCard's verdict is decided here from its results, its model digest and its annotations as
they are now (`card_verdict`, the function the stage uses): rejected → Failed/Rejected, a
manual approval missing → Waiting/WaitingForApproval until `kubectl annotate` names the digest,
then Succeeded/Approved. An attempt that finished for the current generation stays finished:
nothing is created again, even after a restart or after KubeRay deleted the job. One exception,
as `fmforge run` has it: a ModelCard (or an edge Deployment) whose model was made again (its
producer reports another digest than the one its last attempt was planned with, recorded on that
RayJob) is evaluated (packaged) again in the same generation, whatever that attempt's verdict, its
finished RayJob and plan replaced (Pending/ModelChanged): an approval names a digest, so the new
model waits for its own verdict and approval while a Deployment goes on serving the approved one.
"""

from __future__ import annotations

from typing import Any

from ..api.status import FINISHED, Phase
from ..api.v1alpha1 import KINDS, RayResources
from ..api.v1alpha1.modelcard import WAITING_FOR_APPROVAL, card_verdict
from ..kube import builders
from ..kube.client import CONFIGMAPS, RAYJOBS
from ..kube.names import ANNOTATION_MODEL_DIGEST, LABEL_GENERATION, child_name_for
from ..kube.settings import Settings
from .decision import COMMON_OWNED, Decision, phase_status, reason_of
from .refs import is_ready, resolve
from .store import World, spec_of

#: Failures decided before any RayJob ran: a change elsewhere (a reference fixed) can undo them.
DECIDED_HERE = ("ReferenceCycle", "ChildRejected", "InvalidSpec")
#: Ready's reason while the RayJob has ended and the stage's outcome is not in the store yet.
AWAITING_OUTCOME = "AwaitingStageOutcome"
#: Ready's reason while a ModelCard's model (an edge Deployment's), made again, waits to be
#: evaluated (packaged) again.
MODEL_CHANGED = "ModelChanged"
#: The kinds whose attempt is for one model (`spec.modelRef`), made again when it changes.
PER_MODEL = ("ModelCard", "Deployment")


def owned(kind: str) -> tuple[str, ...]:
    """The status fields the operator writes for `kind`: the common ones, `rayJob` where it exists,
    and a ModelCard's approval (decided here from the annotations, after the stage's job)."""
    has = "ray_job" in KINDS[kind].status.model_fields
    card = ("approved", "approvedBy") if kind == "ModelCard" else ()
    return COMMON_OWNED + (("rayJob",) if has else ()) + card


def mirror(rayjob: dict[str, Any]) -> tuple[str, str, str]:
    """(phase, reason, message) of our object from its RayJob's status."""
    name = rayjob["metadata"]["name"]
    st = rayjob.get("status") or {}
    deployment = st.get("jobDeploymentStatus") or ""
    job = st.get("jobStatus") or ""
    why, said = st.get("reason") or "", st.get("message") or ""
    if deployment == "Complete" and job == "SUCCEEDED":
        return Phase.SUCCEEDED, "JobSucceeded", f"RayJob {name} succeeded"
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job in ("FAILED", "STOPPED")):
        detail = f" ({why})" if why else ""
        text = f": {said}" if said else ""
        # In K8sJobMode the submitter is a Job named like the RayJob; its log is the stage's output.
        return (Phase.FAILED, why or "JobFailed",
                f"RayJob {name} failed{detail}{text}; the stage's output: kubectl logs job/{name}")
    if deployment == "Running":
        return Phase.RUNNING, "JobRunning", f"RayJob {name} is running (Ray job {job or 'PENDING'})"
    if deployment == "Retrying":
        why = said or why or "a new Ray cluster is starting"
        return Phase.RUNNING, "JobRetrying", f"RayJob {name} is retrying: {why}"
    if deployment in ("Suspended", "Suspending"):
        return Phase.PENDING, "JobSuspended", f"RayJob {name} is suspended (queued, or waiting for quota)"
    if not deployment:
        # KubeRay has not reported yet: the very status written when the job was created, so that
        # the job's first watch event costs no second status write.
        return Phase.PENDING, "JobCreated", created_message(name)
    return Phase.PENDING, "JobInitializing", f"RayJob {name} is starting its Ray cluster ({deployment})"


def created_message(name: str) -> str:
    return f"created RayJob {name}; waiting for KubeRay to start it"


def _finished(rj: dict[str, Any]) -> bool:
    return mirror(rj)[0] in FINISHED


def outcome_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's outcome for the object's current generation, or None (not written yet, or of
    an older generation)."""
    out = (obj.get("status") or {}).get("outcome") or {}
    return out if out.get("generation") == int(obj["metadata"]["generation"]) else None


def model_changed(obj: dict[str, Any], spec: Any, world: World,
                  mine: dict[str, Any] | None) -> tuple[str, str] | None:
    """(the digest a ModelCard's or an edge Deployment's model has now, the one its last attempt
    of this generation was planned with) when they differ (its producer made the model again);
    None otherwise, and while an attempt runs. The digest an attempt was planned with is on its
    RayJob, so an attempt for the new model is never taken for the old one; a card with no RayJob
    left (or one made before RayJobs carried it) is judged by the digest its stage recorded."""
    if mine is not None and not _finished(mine):
        return None
    producer = world.get(spec.model_ref.kind, spec.model_ref.name)
    if producer is None or not is_ready(producer):
        return None  # being made again: the card is evaluated once it is done
    now = ((producer.get("status") or {}).get("model") or {}).get("digest")
    planned = ((mine or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_MODEL_DIGEST)
    was = planned or (obj.get("status") or {}).get("modelDigest")  # a card's own record
    if not planned and outcome_of(obj) is None:
        return None
    return (now, was) if now and was and now != was else None


def settle(obj: dict[str, Any], spec: Any, job: tuple[str, str, str], name: str) -> tuple[str, str, str, dict]:
    """(phase, reason, message, fields) once the RayJob `name` has ended as `job` says (mirror's
    phase, reason, message): the stage's outcome decides, and a ModelCard's verdict."""
    phase, reason, message = job
    outcome = outcome_of(obj)
    if phase == Phase.FAILED:
        if outcome and outcome.get("verdict") == "Failed":
            # The stage's own words, not KubeRay's "job failed".
            return (Phase.FAILED, outcome.get("reason") or "StageFailed",
                    f"{outcome.get('message')} (RayJob {name}; kubectl logs job/{name})", {})
        return phase, reason, message, {}
    if outcome is None:
        # The stage applies its outcome before its process exits, so it is on its way to the store.
        return Phase.RUNNING, AWAITING_OUTCOME, f"RayJob {name} succeeded; waiting for the stage's outcome", {}
    if obj["kind"] == "ModelCard":
        return card_settle(obj, spec)
    if outcome.get("verdict") == "Rejected":
        return Phase.FAILED, "Rejected", outcome.get("message") or "rejected", {}
    return Phase.SUCCEEDED, reason, outcome.get("message") or message, {}


def card_settle(obj: dict[str, Any], spec: Any) -> tuple[str, str, str, dict]:
    """A ModelCard's verdict from its results and model digest (written by the stage) and its
    approval annotations as they are now."""
    st = obj.get("status") or {}
    v = card_verdict(f"ModelCard/{obj['metadata']['name']}", spec.approval, st.get("results") or [],
                     st.get("modelDigest") or "", obj["metadata"].get("annotations") or {})
    return v.phase, v.reason, v.message, {"approved": v.approved, "approvedBy": v.approved_by}


def decide(obj: dict[str, Any], world: World, children: list[dict[str, Any]], settings: Settings,
           extra_inputs: dict[str, dict[str, Any]] | None = None) -> Decision:
    """The decision for one object whose stage runs as a RayJob; `extra_inputs` (`Kind/name` →
    status) go into the plan beside the references' (a Deployment's approving ModelCard)."""
    kind, meta = obj["kind"], obj["metadata"]
    gen = int(meta["generation"])
    current = dict(obj.get("status") or {})
    fields = owned(kind)
    name = child_name_for(kind, meta["name"], gen)
    ray = {"rayJob": name} if "rayJob" in fields else {}

    def status(phase: str, reason: str, message: str, **more: Any) -> dict[str, Any]:
        return phase_status(current, phase, reason, message, gen, **ray, **more)

    rayjobs = [c for c in children if c["kind"] == "RayJob"]
    # An attempt of an older generation still running is stopped: its spec is no longer wanted.
    # Finished ones stay, with their logs, until KubeRay's TTL or the object's deletion.
    stale = [(RAYJOBS, c["metadata"]["name"], f"generation {gen} replaced it")
             for c in rayjobs if c["metadata"].get("labels", {}).get(LABEL_GENERATION) != str(gen)
             and not _finished(c)]

    try:
        spec = spec_of(obj)
    except ValueError as e:
        msg = f"the spec is invalid: {e}; fix the spec and apply it again"
        return Decision(status(Phase.FAILED, "InvalidSpec", msg), fields, delete=stale, requeue=False, permanent=True)

    mine = next((c for c in rayjobs if c["metadata"]["name"] == name), None)
    if mine is not None and mine["metadata"].get("deletionTimestamp"):
        # Being deleted (by hand, or a card's attempt for a model made again): decided again once
        # it is gone.
        return Decision(current, fields, delete=stale, requeue=True)
    changed = model_changed(obj, spec, world, mine) if kind in PER_MODEL else None
    if changed is not None:
        # Its finished RayJob and plan go (the plan names the old model), and the old outcome
        # with them; once the RayJob is gone the next reconcile makes the attempt for the new model.
        now, was = changed
        why = f"its model is now {now}"
        doing = "evaluating" if kind == "ModelCard" else "packaging"
        msg = f"the model is now {now}, not the {was} of the last attempt: {doing} it again (RayJob {name})"
        unapproved = {"approved": False, "approvedBy": None} if kind == "ModelCard" else {}
        return Decision(status(Phase.PENDING, MODEL_CHANGED, msg, outcome=None, **unapproved),
                        fields + ("outcome",), delete=[*stale, (RAYJOBS, name, why), (CONFIGMAPS, name, why)])
    if mine is not None:
        phase, reason, message = mirror(mine)
        more: dict[str, Any] = {}
        if phase in FINISHED:
            phase, reason, message, more = settle(obj, spec, (phase, reason, message), name)
        return Decision(status(phase, reason, message, **more), fields, delete=stale,
                        requeue=phase not in FINISHED and reason != WAITING_FOR_APPROVAL)
    if kind == "ModelCard" and current.get("observedGeneration") == gen and outcome_of(obj) is not None \
            and current.get("rayJob", name) == name:
        # Evaluated for this generation and its RayJob is gone (KubeRay's TTL): an approval
        # annotated now still counts, decided from the results the stage left in the status.
        phase, reason, message, more = card_settle(obj, spec)
        return Decision(status(phase, reason, message, **more), fields, delete=stale, requeue=False)
    if (current.get("observedGeneration") == gen and current.get("phase") in FINISHED
            and current.get("rayJob", name) == name and reason_of(current) not in DECIDED_HERE):
        # Its RayJob finished for this generation and is gone (KubeRay's TTL, a restart): done.
        return Decision(current, fields, delete=stale, requeue=False)

    res = resolve(obj, world)
    if res.cycle:
        msg = f"the references form a cycle: {res.cycle}; an object cannot depend on itself, fix one of the references"
        return Decision(status(Phase.FAILED, "ReferenceCycle", msg), fields, delete=stale, requeue=False,
                        permanent=True)
    if res.waiting:
        reason = "ProducerNotFound" if res.missing else "WaitingForProducer"
        return Decision(status(Phase.WAITING, reason, "waiting for " + "; ".join(res.waiting)), fields, delete=stale)

    resources = getattr(spec, "resources", None) or RayResources()
    queue = getattr(getattr(spec, "ray", None), "queue", "") or ""
    plan = builders.plan(obj, settings, {**res.inputs, **(extra_inputs or {})})
    job = builders.rayjob(obj, settings, resources, queue)
    if kind in PER_MODEL:
        # the digest this attempt is for: a later one of the producer's starts another attempt
        model = res.inputs.get(f"{spec.model_ref.kind}/{spec.model_ref.name}", {}).get("model") or {}
        job["metadata"].setdefault("annotations", {})[ANNOTATION_MODEL_DIGEST] = model.get("digest") or ""
    create = [builders.plan_configmap(obj, plan), job]
    return Decision(status(Phase.PENDING, "JobCreated", created_message(name)), fields, create=create, delete=stale)
