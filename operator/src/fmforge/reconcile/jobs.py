"""DataPile, TrainingRun, ModelCard, TunedModel (and an edge Deployment): a stage run as a RayJob.

`decide` is level-based and pure: from the object, its namespace's fmforge objects and its
children, it returns the children to create (the plan ConfigMap, then the RayJob of the
current generation), the RayJobs of older generations to stop, and the status, which mirrors
the RayJob (`jobDeploymentStatus`, `jobStatus`, `reason`, `message`). An attempt that finished
for the current generation stays finished: nothing is created again, even after a restart or
after KubeRay deleted the job.
"""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import KINDS, RayResources
from ..kube import builders
from ..kube.client import RAYJOBS
from ..kube.names import LABEL_GENERATION, child_name_for
from ..kube.settings import Settings
from .decision import COMMON_OWNED, Decision, phase_status, reason_of
from .refs import resolve
from .store import World, spec_of

FINISHED = ("Succeeded", "Failed")
#: Failures decided before any RayJob ran: a change elsewhere (a reference fixed) can undo them.
DECIDED_HERE = ("ReferenceCycle", "ChildRejected", "InvalidSpec")


def owned(kind: str) -> tuple[str, ...]:
    """The status fields the operator writes for `kind`: the common ones, and `rayJob` where it exists."""
    has = "ray_job" in KINDS[kind].status.model_fields
    return COMMON_OWNED + (("rayJob",) if has else ())


def mirror(rayjob: dict[str, Any]) -> tuple[str, str, str]:
    """(phase, reason, message) of our object from its RayJob's status."""
    name = rayjob["metadata"]["name"]
    st = rayjob.get("status") or {}
    deployment = st.get("jobDeploymentStatus") or ""
    job = st.get("jobStatus") or ""
    why, said = st.get("reason") or "", st.get("message") or ""
    if deployment == "Complete" and job == "SUCCEEDED":
        return "Succeeded", "JobSucceeded", f"RayJob {name} succeeded"
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job in ("FAILED", "STOPPED")):
        detail = f" ({why})" if why else ""
        text = f": {said}" if said else ""
        # In K8sJobMode the submitter is a Job named like the RayJob; its log is the stage's output.
        return ("Failed", why or "JobFailed",
                f"RayJob {name} failed{detail}{text}; the stage's output: kubectl logs job/{name}")
    if deployment == "Running":
        return "Running", "JobRunning", f"RayJob {name} is running (Ray job {job or 'PENDING'})"
    if deployment == "Retrying":
        return "Running", "JobRetrying", f"RayJob {name} is retrying: {said or why or 'a new Ray cluster is starting'}"
    if deployment in ("Suspended", "Suspending"):
        return "Pending", "JobSuspended", f"RayJob {name} is suspended (queued, or waiting for quota)"
    if not deployment:
        # KubeRay has not reported yet: the very status written when the job was created, so that
        # the job's first watch event costs no second status write.
        return "Pending", "JobCreated", created_message(name)
    return "Pending", "JobInitializing", f"RayJob {name} is starting its Ray cluster ({deployment})"


def created_message(name: str) -> str:
    return f"created RayJob {name}; waiting for KubeRay to start it"


def _finished(rj: dict[str, Any]) -> bool:
    return mirror(rj)[0] in FINISHED


def decide(obj: dict[str, Any], world: World, children: list[dict[str, Any]], settings: Settings) -> Decision:
    """The decision for one object whose stage runs as a RayJob."""
    kind, meta = obj["kind"], obj["metadata"]
    gen = int(meta["generation"])
    current = dict(obj.get("status") or {})
    fields = owned(kind)
    name = child_name_for(kind, meta["name"], gen)
    ray = {"rayJob": name} if "rayJob" in fields else {}

    def status(phase: str, reason: str, message: str) -> dict[str, Any]:
        return phase_status(current, phase, reason, message, gen, **ray)

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
        return Decision(status("Failed", "InvalidSpec", msg), fields, delete=stale, requeue=False, permanent=True)

    mine = next((c for c in rayjobs if c["metadata"]["name"] == name), None)
    if mine is not None:
        phase, reason, message = mirror(mine)
        return Decision(status(phase, reason, message), fields, delete=stale, requeue=phase not in FINISHED)
    if (current.get("observedGeneration") == gen and current.get("phase") in FINISHED
            and current.get("rayJob", name) == name and reason_of(current) not in DECIDED_HERE):
        # Its RayJob finished for this generation and is gone (KubeRay's TTL, a restart): done.
        return Decision(current, fields, delete=stale, requeue=False)

    res = resolve(obj, world)
    if res.cycle:
        msg = f"the references form a cycle: {res.cycle}; an object cannot depend on itself, fix one of the references"
        return Decision(status("Failed", "ReferenceCycle", msg), fields, delete=stale, requeue=False, permanent=True)
    if res.waiting:
        reason = "ProducerNotFound" if res.missing else "WaitingForProducer"
        return Decision(status("Waiting", reason, "waiting for " + "; ".join(res.waiting)), fields, delete=stale)

    resources = getattr(spec, "resources", None) or RayResources()
    queue = getattr(getattr(spec, "ray", None), "queue", "") or ""
    plan = builders.plan(obj, settings, res.inputs)
    create = [builders.plan_configmap(obj, plan), builders.rayjob(obj, settings, resources, queue)]
    return Decision(status("Pending", "JobCreated", created_message(name)), fields, create=create, delete=stale)
