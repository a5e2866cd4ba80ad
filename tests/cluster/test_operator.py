"""The operator (kopf, `fmforge operator`) reconciling real objects on the test control plane.

The API server, its CRD schemas (fmforge's, KubeRay's v1.5.0, KServe's v0.17.0), the garbage
collector and the operator are all real; the KubeRay and KServe controllers are not running
(there is no kubelet for their pods), so the tests play their part by patching the status of
the RayJob or InferenceService the operator created, and then watch our status follow.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any, Callable

import pytest
from badmanifests import BASE
from controlplane import ROOT, ControlPlane
from operatorproc import OperatorProcess

KINDS = {"DataPile": "datapiles", "TrainingRun": "trainingruns", "ModelCard": "modelcards",
         "TunedModel": "tunedmodels", "Deployment": "deployments.fmforge.io"}
STAGE = {"DataPile": "prepare", "TrainingRun": "train", "ModelCard": "eval", "TunedModel": "tune"}


# -- helpers ----------------------------------------------------------------------------------------


def ns(cluster: ControlPlane, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    return name


def manifest(kind: str, name: str, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE[kind])
    doc["metadata"] = {"name": name}
    doc["spec"].update(spec)
    return doc


def apply(cluster: ControlPlane, namespace: str, *docs: dict[str, Any]) -> None:
    body = "\n---\n".join(json.dumps(d) for d in docs)
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=body)


def get(cluster: ControlPlane, namespace: str, resource: str, name: str) -> dict[str, Any] | None:
    r = cluster.kubectl("get", resource, name, "-n", namespace, "-o", "json", check=False)
    if r.returncode != 0:
        if "NotFound" in r.stderr:
            return None
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def status(cluster: ControlPlane, namespace: str, kind: str, name: str) -> dict[str, Any]:
    obj = get(cluster, namespace, KINDS[kind], name) or {}
    return obj.get("status") or {}


def wait_phase(cluster: ControlPlane, namespace: str, kind: str, name: str, phase: str, timeout: float = 30.0):
    def check():
        st = status(cluster, namespace, kind, name)
        return st if st.get("phase") == phase else None
    try:
        return wait_for(f"{kind}/{name} to be {phase}", check, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\nstatus: {json.dumps(status(cluster, namespace, kind, name), indent=1)}") from None


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions", []) if c["type"] == type_)


def patch_child_status(cluster: ControlPlane, namespace: str, resource: str, name: str, st: dict[str, Any]) -> None:
    """Play the KubeRay or KServe controller: write the child's status."""
    cluster.kubectl("patch", resource, name, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": st}))


def rayjob_status(cluster: ControlPlane, namespace: str, name: str, deployment: str, job: str = "",
                  reason: str = "", message: str = "") -> None:
    st: dict[str, Any] = {"jobDeploymentStatus": deployment}
    if job:
        st["jobStatus"] = job
    if reason:
        st["reason"] = reason
    if message:
        st["message"] = message
    patch_child_status(cluster, namespace, "rayjobs", name, st)


def events(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "events", "-n", namespace, "-o", "json",
                          f"--field-selector=involvedObject.name={name}").stdout
    return json.loads(out)["items"]


def succeed(cluster: ControlPlane, namespace: str, kind: str, name: str, gen: int = 1,
            results: dict[str, Any] | None = None) -> None:
    """Play a whole successful attempt: the stage writes its results, KubeRay reports the job done."""
    job = f"{name}-g{gen}-{STAGE[kind]}"
    wait_for(f"RayJob {job}", lambda: get(cluster, namespace, "rayjobs", job))
    if results:
        cluster.kubectl("patch", KINDS[kind], name, "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": results}))
    rayjob_status(cluster, namespace, job, "Complete", "SUCCEEDED")
    wait_phase(cluster, namespace, kind, name, "Succeeded")


PILE_RESULTS = {"version": {"snapshotId": "123", "digest": "sha256:pile"}, "tags": ["v1"]}
MODEL_RESULTS = {"model": {"uri": "pvc://fmforge-artifacts/models/m", "digest": "sha256:model1"}}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, crds, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("operator") / "config.yaml"
    cfg.write_text("runtimeImage: example.com/fmforge/runtime:test\nresyncSeconds: 30\n"
                   "jobs: {ttlSecondsAfterFinished: 600, activeDeadlineSeconds: 7200, backoffLimit: 1}\n")
    op = OperatorProcess(cluster, config=cfg).start()
    yield op
    op.stop()


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
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and not c["securityContext"]["allowPrivilegeEscalation"]
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
    rayjob_status(cluster, n, "docs-g1-prepare", "Complete", "SUCCEEDED")
    st = wait_phase(cluster, n, "DataPile", "docs", "Succeeded")
    ready = condition(st, "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    assert condition(st, "Reconciling")["status"] == "False" and condition(st, "Stalled")["status"] == "False"
    # kubectl wait, as a user or a CI pipeline would
    cluster.kubectl("wait", "--for=condition=Ready", f"datapile/docs", "-n", n, "--timeout=10s")
    reasons = [e["reason"] for e in events(cluster, n, "docs")]
    assert "JobCreated" in reasons and "JobSucceeded" in reasons


def test_failed_job_shows_why_in_status_and_an_event(cluster, operator):
    n = ns(cluster, "fail")
    apply(cluster, n, manifest("DataPile", "docs"))
    wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", "docs-g1-prepare"))
    rayjob_status(cluster, n, "docs-g1-prepare", "Failed", "FAILED", "AppFailed",
                  "Job entrypoint command failed with exit code 2")
    st = wait_phase(cluster, n, "DataPile", "docs", "Failed")
    assert "exit code 2" in st["message"] and "kubectl logs job/docs-g1-prepare" in st["message"]
    assert condition(st, "Ready")["reason"] == "AppFailed" and condition(st, "Stalled")["status"] == "True"
    [ev] = [e for e in events(cluster, n, "docs") if e["reason"] == "AppFailed"]
    assert ev["type"] == "Warning" and "exit code 2" in ev["message"]
