"""The reconcilers as pure functions over plain dicts, the work queue, and the operator's imports."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import uuid

import kopf
import pytest
from badmanifests import BASE

from fmforge.api.v1alpha1 import RayResources
from fmforge.kube import builders
from fmforge.kube.settings import Settings
from fmforge.reconcile import deployment, jobs
from fmforge.reconcile.decision import status_patch
from fmforge.reconcile.queue import WorkQueue
from fmforge.reconcile.refs import find_cycle, resolve
from fmforge.reconcile.store import Store, World

SETTINGS = Settings()


def obj(kind: str, name: str, gen: int = 1, status: dict | None = None, **spec) -> dict:
    o = copy.deepcopy(BASE[kind])
    o["metadata"] = {"name": name, "namespace": "ns", "uid": uuid.uuid4().hex, "generation": gen}
    o["spec"].update(spec)
    if status is not None:
        o["status"] = status
    return o


def done(o: dict, **fields) -> dict:
    o["status"] = {"phase": "Succeeded", "observedGeneration": o["metadata"]["generation"], **fields}
    return o


def world(*objs: dict) -> World:
    return World({(o["kind"], o["metadata"]["name"]): o for o in objs})


def rayjob(name: str, gen: int, deployment_status: str = "", job: str = "", **st) -> dict:
    return {"kind": "RayJob", "metadata": {"name": name, "labels": {"fmforge.io/generation": str(gen)}},
            "status": {"jobDeploymentStatus": deployment_status, "jobStatus": job, **st}}


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


# -- jobs -----------------------------------------------------------------------------------------


def test_a_pile_with_no_child_gets_its_plan_and_rayjob():
    pile = obj("DataPile", "docs")
    d = jobs.decide(pile, world(pile), [], SETTINGS)
    assert [c["kind"] for c in d.create] == ["ConfigMap", "RayJob"]
    assert {c["metadata"]["name"] for c in d.create} == {"docs-g1-prepare"}
    assert d.status["phase"] == "Pending" and d.status["rayJob"] == "docs-g1-prepare"
    assert cond(d.status, "Reconciling")["status"] == "True"


@pytest.mark.parametrize("deployment_status,job,phase,reason", [
    ("", "", "Pending", "JobCreated"),
    ("Initializing", "", "Pending", "JobInitializing"),
    ("Suspended", "", "Pending", "JobSuspended"),
    ("Running", "RUNNING", "Running", "JobRunning"),
    ("Retrying", "", "Running", "JobRetrying"),
    ("Complete", "SUCCEEDED", "Succeeded", "JobSucceeded"),
    ("Complete", "STOPPED", "Failed", "JobFailed"),
    ("Failed", "FAILED", "Failed", "JobFailed"),
    ("ValidationFailed", "", "Failed", "JobFailed"),
])
def test_status_mirrors_the_rayjob(deployment_status, job, phase, reason):
    # The stage wrote its outcome for this generation (it does so before its process exits).
    pile = obj("DataPile", "docs", status={"outcome": {"generation": 1, "verdict": "Succeeded", "message": "made"}})
    d = jobs.decide(pile, world(pile), [rayjob("docs-g1-prepare", 1, deployment_status, job)], SETTINGS)
    assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == (phase, reason)
    assert d.create == [] and d.requeue == (phase not in ("Succeeded", "Failed"))


def test_a_succeeded_job_waits_for_the_stage_outcome_of_its_generation():
    old = {"outcome": {"generation": 1, "verdict": "Succeeded", "message": "an older attempt"}}
    pile = obj("DataPile", "docs", gen=2, status=old)
    d = jobs.decide(pile, world(pile), [rayjob("docs-g2-prepare", 2, "Complete", "SUCCEEDED")], SETTINGS)
    assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == ("Running", jobs.AWAITING_OUTCOME)
    assert d.requeue


def test_a_stage_that_refused_its_input_fails_with_its_own_message():
    said = {"generation": 1, "verdict": "Failed", "reason": "InvalidInput", "message": "source x: no field text"}
    pile = obj("DataPile", "docs", status={"outcome": said})
    d = jobs.decide(pile, world(pile), [rayjob("docs-g1-prepare", 1, "Failed", "FAILED")], SETTINGS)
    assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == ("Failed", "InvalidInput")
    assert d.status["message"].startswith("source x: no field text") and "kubectl logs job/docs-g1-prepare" in \
        d.status["message"]


RESULTS_PASS = [{"name": "ppl", "metric": "perplexity", "value": 12.0, "threshold": {"max": 50}, "passed": True}]
RESULTS_FAIL = [{"name": "ppl", "metric": "perplexity", "value": 80.0, "threshold": {"max": 50}, "passed": False}]


def _evaluated(results, approval="automatic", annotations=None, job=("Complete", "SUCCEEDED")):
    st = {"results": results, "modelDigest": "sha256:m", "approved": False, "rayJob": "card-g1-eval",
          "observedGeneration": 1,
          "outcome": {"generation": 1, "verdict": "Succeeded", "message": "measured"}}
    card = obj("ModelCard", "card", status=st, approval=approval)
    if annotations:
        card["metadata"]["annotations"] = annotations
    children = [rayjob("card-g1-eval", 1, *job)] if job else []
    return card, jobs.decide(card, world(card), children, SETTINGS)


def test_a_card_that_misses_a_threshold_is_rejected_on_the_cluster():
    _, d = _evaluated(RESULTS_FAIL)
    assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == ("Failed", "Rejected")
    assert "ppl perplexity 80 (needs <= 50)" in d.status["message"] and d.status["approved"] is False


def test_a_manual_card_waits_until_annotated_with_its_digest():
    _, d = _evaluated(RESULTS_PASS, "manual")
    assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == ("Waiting", "WaitingForApproval")
    assert "kubectl annotate modelcard card" in d.status["message"] and not d.requeue
    wrong = {"fmforge.io/approved-by": "ana", "fmforge.io/approved-digest": "sha256:other"}
    _, d = _evaluated(RESULTS_PASS, "manual", wrong)
    assert d.status["phase"] == "Waiting" and "the approval by ana was for sha256:other" in d.status["message"]
    right = {"fmforge.io/approved-by": "ana", "fmforge.io/approved-digest": "sha256:m"}
    for job in (("Complete", "SUCCEEDED"), None):  # also after KubeRay deleted the finished job
        _, d = _evaluated(RESULTS_PASS, "manual", right, job)
        assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == ("Succeeded", "Approved")
        assert d.status["approved"] is True and d.status["approvedBy"] == "ana" and d.create == []


def test_an_automatic_card_that_passes_is_approved():
    _, d = _evaluated(RESULTS_PASS)
    assert d.status["phase"] == "Succeeded" and d.status["approvedBy"] == "automatic"


def _card_and_a_new_model(verdict: str = "Succeeded", producer_ready: bool = True):
    """A card done for its generation that evaluated sha256:old, its producer now at sha256:new."""
    name = jobs.child_name_for("ModelCard", "card", 1)
    st = {"phase": "Succeeded", "observedGeneration": 1, "results": RESULTS_PASS, "modelDigest": "sha256:old",
          "approved": True, "approvedBy": "automatic", "rayJob": name,
          "outcome": {"generation": 1, "verdict": verdict, "message": "measured"}}
    card = obj("ModelCard", "card", status=st)
    tuned = done(obj("TunedModel", "pydocs-qa"), model={"uri": "pvc://c/m2", "digest": "sha256:new"})
    if not producer_ready:
        tuned["status"]["phase"] = "Running"
    pile = done(obj("DataPile", "pydocs"), version={"snapshotId": "1", "digest": "sha256:p"}, tags=["v1"])
    return card, world(card, tuned, pile), name


def _attempt(name: str, digest: str | None, *state: str) -> dict:
    """The card's RayJob, planned with `digest` (None: made before RayJobs carried it)."""
    rj = rayjob(name, 1, *state)
    if digest:
        rj["metadata"]["annotations"] = {"fmforge.io/model-digest": digest}
    return rj


def test_a_card_whose_model_was_made_again_is_evaluated_again():
    """As `fmforge run` does: an approval names a digest, so the new model gets its own verdict."""
    card, w, name = _card_and_a_new_model()
    old = _attempt(name, "sha256:old", "Complete", "SUCCEEDED")
    d = jobs.decide(card, w, [old], SETTINGS)
    assert (d.status["phase"], cond(d.status, "Ready")["reason"]) == ("Pending", "ModelChanged")
    assert "the model is now sha256:new, not the sha256:old of the last attempt" in d.status["message"]
    assert {(r.kind, n) for r, n, _ in d.delete} == {("RayJob", name), ("ConfigMap", name)} and d.create == []
    patch = status_patch(card["status"], d.status, d.owned)
    assert patch["outcome"] is None and patch["approved"] is False and patch["approvedBy"] is None
    # the old attempt still in the store (its deletion not seen yet): the same decision, no status moved
    card["status"] = d.status
    d = jobs.decide(card, w, [old], SETTINGS)
    assert d.create == [] and status_patch(card["status"], d.status, d.owned) == {}
    # being deleted (KubeRay's finalizer): waits
    deleting = copy.deepcopy(old)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-06T00:00:00Z"
    d = jobs.decide(card, w, [deleting], SETTINGS)
    assert d.create == [] and d.delete == [] and status_patch(card["status"], d.status, d.owned) == {}
    # gone: the attempt for the new model, its plan and its RayJob naming it
    d = jobs.decide(card, w, [], SETTINGS)
    plan = next(c for c in d.create if c["kind"] == "ConfigMap")["data"]["plan.json"]
    job = next(c for c in d.create if c["kind"] == "RayJob")
    assert [c["kind"] for c in d.create] == ["ConfigMap", "RayJob"] and "sha256:new" in plan
    assert "sha256:old" not in plan and job["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:new"
    # the new attempt finished, even with the status write of its start lost (still ModelChanged):
    # the new model's verdict stands, nothing is made again
    card["status"] = {**card["status"], "modelDigest": "sha256:new", "results": RESULTS_PASS,
                      "outcome": {"generation": 1, "verdict": "Succeeded", "message": "measured"}}
    d = jobs.decide(card, w, [_attempt(name, "sha256:new", "Complete", "SUCCEEDED")], SETTINGS)
    assert d.status["phase"] == "Succeeded" and d.delete == [] and d.status["approved"] is True


def test_a_card_made_before_rayjobs_carried_their_digest_is_judged_by_its_recorded_one():
    card, w, name = _card_and_a_new_model()
    d = jobs.decide(card, w, [_attempt(name, None, "Complete", "SUCCEEDED")], SETTINGS)
    assert cond(d.status, "Ready")["reason"] == "ModelChanged" and "not the sha256:old" in d.status["message"]
    d = jobs.decide(card, w, [], SETTINGS)  # its RayJob gone too
    assert cond(d.status, "Ready")["reason"] == "ModelChanged"


def test_a_failed_card_is_evaluated_once_more_for_a_new_model_then_left_alone():
    # its stage failed on the old model (the producer's files had changed under it, say)
    card, w, name = _card_and_a_new_model(verdict="Failed")
    card["status"]["phase"] = "Failed"
    d = jobs.decide(card, w, [_attempt(name, "sha256:old", "Failed", "FAILED")], SETTINGS)
    assert cond(d.status, "Ready")["reason"] == "ModelChanged"
    # failed again on the new model: no loop
    d = jobs.decide(card, w, [_attempt(name, "sha256:new", "Failed", "FAILED")], SETTINGS)
    assert d.status["phase"] == "Failed" and d.delete == [] and d.create == []


def test_a_card_is_not_evaluated_again_while_its_model_is_made_or_its_attempt_runs():
    card, w, name = _card_and_a_new_model(producer_ready=False)
    d = jobs.decide(card, w, [_attempt(name, "sha256:old", "Complete", "SUCCEEDED")], SETTINGS)
    assert d.status["phase"] == "Succeeded" and d.delete == []
    card, w, name = _card_and_a_new_model()
    d = jobs.decide(card, w, [_attempt(name, "sha256:old", "Running", "RUNNING")], SETTINGS)
    assert d.delete == [] and d.status["phase"] == "Running"


def test_a_failed_job_says_why_and_where_the_output_is():
    pile = obj("DataPile", "docs")
    rj = rayjob("docs-g1-prepare", 1, "Failed", "FAILED", reason="DeadlineExceeded", message="took too long")
    d = jobs.decide(pile, world(pile), [rj], SETTINGS)
    assert cond(d.status, "Ready")["reason"] == "DeadlineExceeded"
    assert "took too long" in d.status["message"] and "kubectl logs job/docs-g1-prepare" in d.status["message"]
    assert cond(d.status, "Stalled")["status"] == "True"


def test_a_finished_generation_is_not_started_again_when_its_rayjob_is_gone():
    pile = done(obj("DataPile", "docs"), rayJob="docs-g1-prepare")
    d = jobs.decide(pile, world(pile), [], SETTINGS)
    assert d.create == [] and not d.requeue and status_patch(pile["status"], d.status, d.owned) == {}


def test_a_new_generation_stops_the_running_attempt_and_keeps_finished_ones():
    pile = obj("DataPile", "docs", gen=3)
    old = [rayjob("docs-g1-prepare", 1, "Complete", "SUCCEEDED"), rayjob("docs-g2-prepare", 2, "Running", "RUNNING")]
    d = jobs.decide(pile, world(pile), old, SETTINGS)
    assert [name for _, name, _ in d.delete] == ["docs-g2-prepare"]
    assert d.create[1]["metadata"]["name"] == "docs-g3-prepare"
    assert d.status["observedGeneration"] == 3


def test_consumers_wait_for_their_producer_and_name_it():
    pile = obj("DataPile", "pydocs", status={"phase": "Running", "observedGeneration": 1, "message": "busy"})
    run = obj("TrainingRun", "gpt", dataPileRef={"name": "pydocs", "tag": "v1"})
    d = jobs.decide(run, world(pile, run), [], SETTINGS)
    assert d.status["phase"] == "Waiting" and d.create == []
    assert d.status["message"] == "waiting for DataPile/pydocs (Running)"
    assert cond(d.status, "Ready")["reason"] == "WaitingForProducer"
    # Succeeded for an older generation is not ready either
    pile["metadata"]["generation"] = 2
    pile["status"] = {"phase": "Succeeded", "observedGeneration": 1, "tags": ["v1"]}
    assert jobs.decide(run, world(pile, run), [], SETTINGS).status["phase"] == "Waiting"
    # nor is a pile without the tag asked for
    done(pile, tags=["v2"])
    d = jobs.decide(run, world(pile, run), [], SETTINGS)
    assert d.status["message"] == "waiting for DataPile/pydocs to publish a version tagged 'v1' (its tags: ['v2'])"
    done(pile, tags=["v1"], version={"snapshotId": "42"})
    d = jobs.decide(run, world(pile, run), [], SETTINGS)
    assert d.status["phase"] == "Pending"
    import json
    plan = json.loads(d.create[0]["data"]["plan.json"])
    assert plan["inputs"] == {"DataPile/pydocs": pile["status"]}


def test_a_missing_producer_and_a_cycle():
    run = obj("TrainingRun", "gpt", dataPileRef={"name": "nope"})
    d = jobs.decide(run, world(run), [], SETTINGS)
    assert cond(d.status, "Ready")["reason"] == "ProducerNotFound"
    assert d.status["message"] == ("waiting for DataPile/nope, which does not exist (create it, or fix "
                                   "spec.dataPileRef)")
    a = obj("TunedModel", "a", baseModelRef={"kind": "TunedModel", "name": "b"})
    b = obj("TunedModel", "b", baseModelRef={"kind": "TunedModel", "name": "c"})
    c = obj("TunedModel", "c", baseModelRef={"kind": "TunedModel", "name": "a"})
    assert find_cycle(a, world(a, b, c)) == "TunedModel/a -> TunedModel/b -> TunedModel/c -> TunedModel/a"
    d = jobs.decide(a, world(a, b, c), [], SETTINGS)
    assert d.status["phase"] == "Failed" and d.permanent and d.create == []
    # fixing b breaks the cycle: a, Failed for its generation, goes on
    a["status"] = d.status
    b["spec"]["baseModelRef"] = {"kind": "TrainingRun", "name": "gpt"}
    b["metadata"]["generation"] = 2
    d = jobs.decide(a, world(a, b, c), [], SETTINGS)
    assert d.status["phase"] == "Waiting" and "TunedModel/b (Pending)" in d.status["message"]
    selfish = obj("TunedModel", "s", baseModelRef={"kind": "TunedModel", "name": "s"})
    assert resolve(selfish, world(selfish)).cycle == "TunedModel/s -> TunedModel/s"
    assert find_cycle(b, world(b)) is None


def test_status_is_written_only_when_it_changed():
    pile = obj("DataPile", "docs")
    d = jobs.decide(pile, world(pile), [rayjob("docs-g1-prepare", 1, "Running", "RUNNING")], SETTINGS)
    patch = status_patch({}, d.status, d.owned)
    assert set(patch) == {"phase", "message", "conditions", "observedGeneration", "rayJob"}
    pile["status"] = {**d.status, "stats": {"tokens": 5}}  # a stage field, not ours
    again = jobs.decide(pile, world(pile), [rayjob("docs-g1-prepare", 1, "Running", "RUNNING")], SETTINGS)
    assert status_patch(pile["status"], again.status, again.owned) == {}
    assert again.status["stats"] == {"tokens": 5}


# -- Deployment -----------------------------------------------------------------------------------


def _serving(card_status: dict | None):
    model = done(obj("TrainingRun", "gpt"), model={"uri": "pvc://m/gpt", "digest": "sha256:a"})
    dep = obj("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"})
    objs = [model, dep]
    if card_status is not None:
        card = obj("ModelCard", "card", modelRef={"kind": "TrainingRun", "name": "gpt"})
        card["status"] = {"phase": "Succeeded", "observedGeneration": 1, **card_status}
        objs.append(card)
    return dep, world(*objs)


@pytest.mark.parametrize("card,why", [
    (None, "no ModelCard evaluates TrainingRun/gpt"),
    ({"approved": False, "modelDigest": "sha256:a"}, "ModelCard/card did not approve it"),
    ({"approved": True, "modelDigest": "sha256:b"}, "ModelCard/card evaluated model sha256:b, not sha256:a"),
])
def test_deployment_waits_for_an_approved_card_of_the_exact_digest(card, why):
    dep, w = _serving(card)
    d = deployment.decide(dep, w, [], SETTINGS)
    assert d.status["phase"] == "Waiting" and why in d.status["message"] and d.apply == []
    assert cond(d.status, "Ready")["reason"] == "WaitingForApprovedModelCard"


def test_an_edge_deployment_s_plan_carries_the_card_that_opened_the_gate():
    """The edge stage applies the gate again in its pod: the plan must hold the approving card
    (it held the model only, and the stage in the pod found no card)."""
    import json

    dep, w = _serving({"approved": True, "modelDigest": "sha256:a"})
    dep["spec"]["target"] = "edge"
    dep["spec"].pop("kserve", None)
    d = deployment.decide(dep, w, [], SETTINGS)
    plan = json.loads(next(c for c in d.create if c["kind"] == "ConfigMap")["data"]["plan.json"])
    assert plan["inputs"]["ModelCard/card"]["approved"] is True
    assert plan["inputs"]["TrainingRun/gpt"]["model"]["digest"] == "sha256:a"


def test_deployment_applies_its_inference_service_once_and_mirrors_ready():
    dep, w = _serving({"approved": True, "modelDigest": "sha256:a"})
    d = deployment.decide(dep, w, [], SETTINGS)
    [isvc] = d.apply
    assert isvc["metadata"]["name"] == "serve" and isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://m/gpt"
    assert d.status["servedModel"] == {"uri": "pvc://m/gpt", "digest": "sha256:a", "modelCard": "card"}
    isvc["metadata"]["generation"] = 1
    isvc["status"] = {"observedGeneration": 1, "url": "http://serve.ns",
                      "conditions": [{"type": "Ready", "status": "True"}]}
    d = deployment.decide(dep, w, [isvc], SETTINGS)
    assert d.apply == [] and d.status["phase"] == "Ready" and d.status["url"] == "http://serve.ns"
    dep["status"] = d.status
    isvc["status"]["conditions"][0] = {"type": "Ready", "status": "False", "message": "predictor crashed"}
    d = deployment.decide(dep, w, [isvc], SETTINGS)
    assert d.status["phase"] == "Degraded" and "predictor crashed" in d.status["message"]
    # a canary change renders a different spec: applied again, in place (same name)
    dep["spec"]["kserve"]["canaryTrafficPercent"] = 20
    dep["metadata"]["generation"] = 2  # as the API server does on every spec change
    [again] = deployment.decide(dep, w, [isvc], SETTINGS).apply
    assert again["metadata"]["name"] == "serve" and again["spec"]["predictor"]["canaryTrafficPercent"] == 20


def test_the_fmforge_runtime_serves_through_the_charts_cluster_serving_runtime():
    dep, w = _serving({"approved": True, "modelDigest": "sha256:a"})
    dep["spec"]["kserve"]["runtime"] = "fmforge"
    [isvc] = deployment.decide(dep, w, [], SETTINGS).apply
    pred = isvc["spec"]["predictor"]
    m = pred["model"]
    assert "containers" not in pred and m["runtime"] == "fmforge" and m["modelFormat"] == {"name": "fmforge"}
    # appended by KServe to the runtime's args: the predictor refuses files of any other digest
    assert m["args"] == ["--model-digest", "sha256:a"] and m["storageUri"] == "pvc://m/gpt"
    assert m["securityContext"]["allowPrivilegeEscalation"] is False


def test_a_model_a_stage_wrote_on_a_claim_is_given_to_kserve_as_a_pvc_uri():
    """A stage reports the path its Ray pod saw (file:///mnt/pvc/CLAIM/...): KServe cannot read
    file:// URIs, and mounts a claim only for pvc://CLAIM/PATH."""
    assert builders.serving_uri("file:///mnt/pvc/data/artifacts/TrainingRun/gpt/ab/model") == \
        "pvc://data/artifacts/TrainingRun/gpt/ab/model"
    for kept in ("s3://b/m", "pvc://data/m", "file:///elsewhere/m", "file:///mnt/pvc/data"):
        assert builders.serving_uri(kept) == kept


def test_expose_route_applies_a_route_before_the_inference_service_and_deletes_it_when_turned_off():
    dep, w = _serving({"approved": True, "modelDigest": "sha256:a"})
    dep["spec"]["kserve"]["expose"] = "route"
    d = deployment.decide(dep, w, [], SETTINGS)
    route, isvc = d.apply
    assert route["kind"] == "Route" and route["apiVersion"] == "route.openshift.io/v1"
    assert route["spec"]["to"] == {"kind": "Service", "name": "serve-predictor", "weight": 100}
    assert route["spec"]["tls"] == {"termination": "edge", "insecureEdgeTerminationPolicy": "Redirect"}
    assert route["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
    assert isvc["metadata"]["annotations"]["fmforge.io/route"] == "serve" and d.delete == []
    # applied: nothing again
    assert deployment.decide(dep, w, [isvc], SETTINGS).apply == []
    # the TLS setting is part of the hash: a change applies both again
    dep["spec"]["kserve"]["routeTls"] = "none"
    dep["metadata"]["generation"] = 2
    route2, _ = deployment.decide(dep, w, [isvc], SETTINGS).apply
    assert "tls" not in route2["spec"]
    # expose none: the InferenceService alone, and the Route it recorded is deleted
    dep["spec"]["kserve"]["expose"] = "none"
    dep["metadata"]["generation"] = 3
    d = deployment.decide(dep, w, [isvc], SETTINGS)
    [plain] = d.apply
    assert plain["kind"] == "InferenceService" and "fmforge.io/route" not in plain["metadata"]["annotations"]
    [(res, name, why)] = d.delete
    assert (res.kind, name) == ("Route", "serve") and "expose" in why
    # and once that is applied, no Route is deleted again
    assert deployment.decide(dep, w, [plain], SETTINGS).delete == []


def test_a_tuning_configmap_is_mounted_into_the_ray_pods_and_named_in_the_plan():
    from fmforge.kube import builders

    tm = obj("TunedModel", "qa")
    tm["spec"]["data"] = {"configMap": {"name": "qa-examples", "key": "qa.jsonl"}, "promptTemplate": "{q}"}
    rj = builders.rayjob(tm, SETTINGS, RayResources(workers=2))
    for group in (rj["spec"]["rayClusterSpec"]["headGroupSpec"], rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]):
        pod = group["template"]["spec"]
        assert {"name": "configmap-0", "configMap": {"name": "qa-examples"}} in pod["volumes"]
        [c] = pod["containers"]
        assert {"name": "configmap-0", "mountPath": "/etc/fmforge/configmaps/qa-examples",
                "readOnly": True} in c["volumeMounts"]
    assert builders.plan(tm, SETTINGS, {})["configMaps"] == {"qa-examples": "/etc/fmforge/configmaps/qa-examples"}
    # a file-based tuning set mounts nothing of the kind
    plain = builders.rayjob(obj("TunedModel", "qa"), SETTINGS, RayResources())
    assert not [v for v in plain["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
                if "configMap" in v and v["name"] != "plan"]


def test_a_tuning_pile_is_a_reference_the_tuned_model_waits_for():
    pile = obj("DataPile", "docs")
    tm = obj("TunedModel", "qa")
    tm["spec"]["data"] = {"dataPileRef": {"name": "docs", "tag": "v2"}, "promptTemplate": "{text}"}
    tm["spec"]["baseModelRef"] = {"kind": "TrainingRun", "name": "gpt"}
    base = done(obj("TrainingRun", "gpt"), model={"uri": "pvc://m/gpt", "digest": "sha256:a"})
    r = resolve(tm, world(pile, base, tm))
    assert r.waiting == ["DataPile/docs (Pending)"]
    done(pile, tags=["v1"])
    assert "tagged 'v2'" in resolve(tm, world(pile, base, tm)).waiting[0]
    pile["status"]["tags"] = ["v1", "v2"]
    assert set(resolve(tm, world(pile, base, tm)).inputs) == {"DataPile/docs", "TrainingRun/gpt"}


# -- store and queue ------------------------------------------------------------------------------


def test_a_producer_change_queues_its_readers():
    store = Store()
    pile, run = obj("DataPile", "pydocs"), obj("TrainingRun", "gpt", dataPileRef={"name": "pydocs"})
    card = obj("ModelCard", "card", modelRef={"kind": "TrainingRun", "name": "gpt"})
    dep = obj("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"})
    for o in (pile, run, card, dep):
        store.put(o)
    assert store.put(pile) == [("ns", "DataPile", "pydocs"), ("ns", "ModelCard", "card"), ("ns", "TrainingRun", "gpt")]
    assert ("ns", "Deployment", "serve") in store.put(card)  # the card's approval gates the Deployment
    run["spec"]["dataPileRef"]["name"] = "other"
    run["metadata"]["generation"] = 2
    store.put(run)
    assert ("ns", "TrainingRun", "gpt") not in store.put(pile)


def test_queue_coalesces_reruns_after_a_change_and_retries_by_error_type():
    async def main():
        calls: list[str] = []
        gate = asyncio.Event()
        errors = {"temp": [kopf.TemporaryError("not yet", delay=0.01)], "perm": [kopf.PermanentError("no")]}

        async def handler(key):
            calls.append(key)
            if key == "slow":
                await gate.wait()
            if errors.get(key):
                raise errors[key].pop()
            return None

        q = WorkQueue(handler, workers=2)
        q.start()
        for _ in range(3):
            q.add("slow")  # queued once
        await asyncio.sleep(0.01)
        q.add("slow")  # arrives while it runs: run once more afterwards
        q.add("slow")
        gate.set()
        q.add("temp")
        q.add("perm")

        async def settled():  # polled, not slept: a loaded machine may run the retry late
            while not (calls.count("slow") >= 2 and calls.count("temp") >= 2 and "perm" in calls):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(settled(), 30)
        await asyncio.sleep(0.05)  # a third run, if the queue wrongly made one, would come now
        await q.stop()
        return calls

    calls = asyncio.run(main())
    assert calls.count("slow") == 2 and calls.count("temp") == 2 and calls.count("perm") == 1


def test_the_operator_process_never_imports_torch_or_ray():
    code = ("import sys, fmforge.handlers, fmforge.cli; "
            "bad = [m for m in ('torch', 'ray', 'transformers', 'fmforge.stages', 'fmforge.runtime') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rayjob_builder_mounts_claims_and_requests_gpus():
    from fmforge.kube.builders import rayjob

    pile = obj("DataPile", "docs")
    pile["spec"]["sources"][0]["uri"] = "pvc://corpora/prose/"
    s = Settings(storage_uri="pvc://artifacts/fm", storage_secret="s3-creds", queue="default-q")
    rj = rayjob(pile, s, RayResources(workers=3, gpus_per_worker=2, cpus_per_worker=4, memory="16Gi"))
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default-q"
    worker = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 3
    [c] = worker["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/mnt/pvc/artifacts", "/mnt/pvc/corpora",
                                                            "/mnt/pvc/fmforge-artifacts", "/etc/fmforge/plan"}
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert '"warehouse": "file:///mnt/pvc/fmforge-artifacts/warehouse"' in env["FMFORGE_CATALOG"]
    assert "activeDeadlineSeconds" not in rj["spec"]


def test_an_edge_package_passes_the_same_gate_then_runs_as_a_rayjob():
    dep, w = _serving(None)
    dep["spec"] = {"modelRef": {"kind": "TrainingRun", "name": "gpt"}, "target": "edge"}
    d = deployment.decide(dep, w, [], SETTINGS)
    assert d.status["phase"] == "Waiting" and d.create == []
    dep["spec"]["requireApprovedModelCard"] = False
    dep["metadata"]["generation"] = 2
    d = deployment.decide(dep, w, [], SETTINGS)
    assert [c["kind"] for c in d.create] == ["ConfigMap", "RayJob"]
    assert d.create[1]["metadata"]["name"] == "serve-g2-serve"


def test_an_edge_package_of_an_older_model_is_made_again_once_the_new_one_is_approved():
    dep, w = _serving({"approved": True, "modelDigest": "sha256:a"})
    dep["spec"] = {"modelRef": {"kind": "TrainingRun", "name": "gpt"}, "target": "edge"}
    d = deployment.decide(dep, w, [], SETTINGS)
    job = d.create[1]
    assert job["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:a"
    # packaged; then the model is made again and its card approves the new digest
    job["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    dep["status"] = {"phase": "Succeeded", "observedGeneration": 1, "rayJob": job["metadata"]["name"],
                     "outcome": {"generation": 1, "verdict": "Succeeded", "message": "packaged"}}
    w.get("TrainingRun", "gpt")["status"]["model"] = {"uri": "pvc://m/gpt2", "digest": "sha256:b"}
    w.get("ModelCard", "card")["status"]["modelDigest"] = "sha256:b"
    d = deployment.decide(dep, w, [job], SETTINGS)
    assert cond(d.status, "Ready")["reason"] == "ModelChanged" and "packaging it again" in d.status["message"]
    assert {n for _, n, _ in d.delete} == {job["metadata"]["name"]} and "approved" not in d.status
    dep["status"] = d.status
    d = deployment.decide(dep, w, [], SETTINGS)
    assert d.create[1]["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:b"


def test_operator_flags_default_to_the_environment(monkeypatch):
    from fmforge.cli import build_parser

    monkeypatch.setenv("FMFORGE_METRICS_PORT", "9999")
    monkeypatch.setenv("FMFORGE_LOG_FORMAT", "json")
    args = build_parser().parse_args(["operator"])
    assert (args.metrics_port, args.health_port, args.log_format, args.namespace) == (9999, 8080, "json", None)
    args = build_parser().parse_args(["operator", "--namespace", "a", "--namespace", "b", "--metrics-port", "0"])
    assert args.namespace == ["a", "b"] and args.metrics_port == 0
