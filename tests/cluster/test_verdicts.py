"""A ModelCard's verdict on the real control plane: rejected, waiting for a person, approved.

The operator runs for real against the real API server. The ModelCard stage runs for real too:
the very entrypoint function of its RayJob (`fmforge.runtime.job.execute`), with the plan read
from the ConfigMap the operator made and the token of the namespace's `fmforge-stage`
ServiceAccount, writing the card's results and outcome into the status as it does from a pod. It
runs on this host (the plan's folders pointed at a temporary directory, where the pod's volume
would be) because this tier has no kubelet; only KubeRay's part, the RayJob's final state, is
played by the test. Then `kubectl annotate` approves, as a reviewer or an Argo CD sync of the
approval pull request would.
"""

from __future__ import annotations

import json
from pathlib import Path

from controlplane import ControlPlane
from operatorproc import (
    PILE_RESULTS,
    apply,
    condition,
    events,
    get,
    manifest,
    ns,
    rayjob_status,
    status,
    succeed,
    wait_for,
    wait_phase,
)
from tinymodel import tiny_gpt

from fmforge.kube.stagestatus import StatusWriter
from fmforge.runtime.job import execute
from fmforge.stages.artifacts import model_digest


def _card(name: str, minimum: float, approval: str = "automatic") -> dict:
    return manifest("ModelCard", name, modelRef={"kind": "TrainingRun", "name": "gpt"}, approval=approval,
                    benchmarks=[{"name": "qa", "type": "prompts", "uri": "file://evals/qa.jsonl", "metric": "contains",
                                 "maxNewTokens": 4, "threshold": {"min": minimum}}])


def _run_stage(cluster: ControlPlane, n: str, name: str, job: str, root: Path) -> dict:
    """The card's stage, as its RayJob's entrypoint runs it, then KubeRay's report that it ended."""
    plan = json.loads(wait_for("the plan", lambda: get(cluster, n, "configmaps", job))["data"]["plan.json"])
    plan.update(baseDir=str(root), artifacts=str(root / "artifacts" / name), stateDir=str(root / "state"))
    token = cluster.kubectl("create", "token", "fmforge-stage", "-n", n).stdout.strip()
    writer = StatusWriter(plan["status"], cluster.url, token, str(cluster.workdir / "pki" / "ca.crt"))
    out, code = execute(plan, writer)
    assert code == 0, out
    # the operator makes the RayJob after its plan's ConfigMap
    wait_for("the RayJob", lambda: get(cluster, n, "rayjobs", job))
    rayjob_status(cluster, n, job, "Complete", "SUCCEEDED")
    return out


def test_a_card_s_verdict_and_its_approval_gate_the_deployment(cluster, operator, tmp_path: Path):
    n = ns(cluster, "verdict")
    model = tiny_gpt(tmp_path / "gpt")
    digest = model_digest(model)
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "qa.jsonl").write_text("".join(json.dumps({"prompt": q, "expected": a}) + "\n"
                                                         for q, a in (("def", "("), ("import", "os"))))
    apply(cluster, n, manifest("DataPile", "pydocs"), manifest("TrainingRun", "gpt", dataPileRef={"name": "pydocs"}))
    succeed(cluster, n, "DataPile", "pydocs", results=PILE_RESULTS)
    succeed(cluster, n, "TrainingRun", "gpt", results={"model": {"uri": model.as_uri(), "digest": digest}})
    apply(cluster, n, _card("strict", 1.5), _card("gate", 0.0, "manual"),
          manifest("Deployment", "serve", modelRef={"kind": "TrainingRun", "name": "gpt"}))

    # A threshold no model can meet (contains is at most 1): rejected, a Warning Event says why.
    out = _run_stage(cluster, n, "strict", "strict-g1-eval", tmp_path)
    assert out["verdict"] == "Rejected"
    st = wait_phase(cluster, n, "ModelCard", "strict", "Failed")
    assert condition(st, "Ready")["reason"] == "Rejected" and "(needs >= 1.5)" in st["message"]
    assert st["approved"] is False and st["modelDigest"] == digest and condition(st, "Stalled")["status"] == "True"
    [ev] = wait_for("the Rejected event",
                    lambda: [e for e in events(cluster, n, "strict") if e["reason"] == "Rejected"])
    assert ev["type"] == "Warning"

    # A manual card: every threshold passed, and it waits for a person.
    assert _run_stage(cluster, n, "gate", "gate-g1-eval", tmp_path)["verdict"] == "WaitingForApproval"
    st = wait_phase(cluster, n, "ModelCard", "gate", "Waiting")
    assert condition(st, "Ready")["reason"] == "WaitingForApproval" and digest in st["message"]
    dep = wait_for("the Deployment to name the waiting card", lambda: (
        s := status(cluster, n, "Deployment", "serve")).get("message", "").count("ModelCard/gate waits") and s)
    assert condition(dep, "Ready")["reason"] == "WaitingForApproval" and get(cluster, n, "inferenceservices",
                                                                            "serve") is None

    # An approval of another digest changes nothing but the message.
    cluster.kubectl("annotate", "modelcard", "gate", "-n", n, "fmforge.io/approved-by=ana",
                    "fmforge.io/approved-digest=sha256:not-this-one")
    st = wait_for("the stale approval's message", lambda: (
        s := status(cluster, n, "ModelCard", "gate")).get("message", "").count("sha256:not-this-one") and s)
    assert st["phase"] == "Waiting" and "the approval by ana was for sha256:not-this-one" in st["message"]
    assert get(cluster, n, "inferenceservices", "serve") is None

    # The approval of exactly the evaluated digest: approved, and the Deployment serves it.
    cluster.kubectl("annotate", "--overwrite", "modelcard", "gate", "-n", n, f"fmforge.io/approved-digest={digest}")
    st = wait_phase(cluster, n, "ModelCard", "gate", "Succeeded")
    assert condition(st, "Ready")["reason"] == "Approved" and st["approved"] is True and st["approvedBy"] == "ana"
    isvc = wait_for("the InferenceService", lambda: get(cluster, n, "inferenceservices", "serve"))
    assert isvc["metadata"]["annotations"]["fmforge.io/model-digest"] == digest
    st = wait_phase(cluster, n, "Deployment", "serve", "Running")
    assert st["servedModel"] == {"uri": model.as_uri(), "digest": digest, "modelCard": "gate"}
