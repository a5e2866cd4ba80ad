"""The CRDs, the examples and the chart against a real kube-apiserver (with KubeRay and KServe CRDs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from badmanifests import BASE, CASES, Case
from controlplane import ROOT, ControlPlane
from tools import build, unavailable

from fmforge.api.v1alpha1 import KINDS
from fmforge.kube.builders import plan_configmap

# examples/gitops holds a Kustomize base and Argo CD Applications, and examples/quickstart/node a
# Kustomize overlay, not plain manifests: test_gitops.py renders and applies them.
EXAMPLE_FILES = sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                       if ".fmforge" not in p.parts and p.relative_to(ROOT / "examples").parts[0] != "gitops"
                       and p.name != "kustomization.yaml")


def _ns(cluster: ControlPlane, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    return name


def test_third_party_crds_are_installed(cluster: ControlPlane, crds: dict[str, str]):
    names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    for crd in ("rayjobs.ray.io", "rayclusters.ray.io", "inferenceservices.serving.kserve.io",
                "datapiles.fmforge.io", "deployments.fmforge.io"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}" in names
    print(f"CRD origins: {crds}")


def test_real_kuberay_and_kserve_schemas_accept_their_objects(cluster: ControlPlane, crds):
    if "stand-in" in (crds["ray.io"], crds["serving.kserve.io"]):
        unavailable("a stand-in CRD is installed; its schema proves nothing")
    ns = _ns(cluster, "thirdparty")
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "probe"},
              "spec": {"entrypoint": "python -m fmforge.runtime.job",
                       "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {
                           "containers": [{"name": "ray-head", "image": "fmforge/runtime"}]}}}}}}
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "probe"},
            "spec": {"predictor": {"model": {"modelFormat": {"name": "huggingface"},
                                             "storageUri": "pvc://models/probe"}}}}
    for obj in (rayjob, isvc):
        cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj))
    # and a real schema rejects what does not belong (a stand-in would accept it)
    bad = {**rayjob, "spec": {**rayjob["spec"], "entrypoint": 42}}
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(bad), check=False)
    assert r.returncode != 0 and "entrypoint" in r.stderr


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_is_accepted(cluster: ControlPlane, crds, path: Path):
    ns = _ns(cluster, "examples")
    r = cluster.kubectl("apply", "--server-side", "-n", ns, "-f", str(path))
    assert "serverside-applied" in r.stdout


def test_kubectl_get_fmforge_lists_all_examples(cluster: ControlPlane, crds):
    ns = _ns(cluster, "quickstart")
    cluster.kubectl("apply", "--server-side", "-n", ns, "-f", str(ROOT / "examples" / "quickstart"))
    out = cluster.kubectl("get", "fmforge", "-n", ns).stdout
    for obj in ("datapile.fmforge.io/pydocs", "trainingrun.fmforge.io/pydocs-gpt", "tunedmodel.fmforge.io/pydocs-qa",
                "modelcard.fmforge.io/pydocs-qa", "deployment.fmforge.io/pydocs-qa"):
        assert obj in out, out
    headers = [line.split() for line in out.splitlines() if line.startswith("NAME")]
    assert ["NAME", "PHASE", "VERSION", "TAGS", "DOCS", "TOKENS", "AGE"] in headers
    assert ["NAME", "PHASE", "TARGET", "MODEL", "URL", "AGE"] in headers
    # the short names and the collision-free name of Deployment work
    assert "pydocs-qa" in cluster.kubectl("get", "fmdeploy", "-n", ns).stdout
    assert "pydocs-qa" in cluster.kubectl("get", "deployments.fmforge.io", "-n", ns).stdout
    # the API server applied the CRD's defaults
    pile = json.loads(cluster.kubectl("get", "datapile", "pydocs", "-n", ns, "-o", "json").stdout)
    # (fields the quickstart leaves out)
    assert pile["spec"]["tokenizer"]["train"]["minFrequency"] == 2
    assert pile["spec"]["sources"][0]["invalidText"] == "skip"
    assert pile["spec"]["sources"][2]["maxDocumentBytes"] == "2Mi"


def _lineage(cluster: ControlPlane, *args: str) -> subprocess.CompletedProcess:
    """The real command line, as a person runs it, against this API server."""
    return subprocess.run([sys.executable, "-m", "fmforge.cli", "lineage", *args], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, timeout=120)


def test_lineage_reads_the_chain_from_the_statuses_on_the_cluster(cluster: ControlPlane, crds):
    """`fmforge lineage --cluster`: endpoint -> model -> pile version -> sources with their digests,
    from what the API server keeps of the statuses (a field the CRD lacked would be pruned here).
    The statuses are written by hand: this tests the reader; the node tier reads the ones the
    stages and the operator wrote."""
    ns = _ns(cluster, "lineage")
    cluster.kubectl("apply", "--server-side", "-n", ns, "-f", str(ROOT / "examples" / "quickstart" / "datapile.yaml"),
                    "-f", str(ROOT / "examples" / "quickstart" / "trainingrun.yaml"))
    dep = {"apiVersion": "fmforge.io/v1alpha1", "kind": "Deployment", "metadata": {"name": "gpt", "namespace": ns},
           "spec": {"modelRef": {"kind": "TrainingRun", "name": "pydocs-gpt"}, "requireApprovedModelCard": False,
                    "target": "kserve", "kserve": {"runtime": "fmforge"}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(dep))
    src, model = "sha256:" + "ab" * 32, {"uri": "pvc://fmforge-data/artifacts/m", "digest": "sha256:" + "ef" * 32}
    statuses = {
        ("datapile", "pydocs"): {"phase": "Succeeded", "tags": ["v1"],
                                 "version": {"snapshotId": "4242", "digest": "sha256:" + "cd" * 32},
                                 "sources": [{"name": "python-docs", "uri": "pvc://fmforge-data/corpus/prose/",
                                              "digest": src}]},
        ("trainingrun", "pydocs-gpt"): {"phase": "Succeeded", "dataPile": {"name": "pydocs", "snapshotId": "4242",
                                                                           "tag": "v1"},
                                        "model": model},
        ("deployments.fmforge.io", "gpt"): {"phase": "Ready", "url": "http://gpt-predictor.example",
                                            "servedModel": model},
    }
    for (resource, name), status in statuses.items():
        cluster.kubectl("patch", resource, name, "-n", ns, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": status}))
    r = _lineage(cluster, "Deployment/gpt", "--cluster", "-n", ns)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Deployment/gpt: Ready") and "serving sha256:efefefefefef" in lines[0] \
        and "at http://gpt-predictor.example" in lines[0], lines
    assert "└─ TrainingRun/pydocs-gpt: Succeeded" in lines[1] and "trained on pydocs snapshot 4242" in lines[1], lines
    assert "└─ DataPile/pydocs: Succeeded" in lines[2] and "snapshot 4242" in lines[2] and "tags v1" in lines[2]
    assert lines[3].strip() == f"└─ source python-docs: pvc://fmforge-data/corpus/prose/ {src}", lines
    # errors a person meets: no such object, and no cluster to read
    r = _lineage(cluster, "TrainingRun/nope", "--cluster", "-n", ns)
    assert r.returncode == 1 and f"TrainingRun/nope not found in namespace {ns} of the cluster" in r.stderr, r.stderr
    r = _lineage(cluster, "DataPile/pydocs", "--cluster", "--kubeconfig", "/nonexistent/kubeconfig")
    assert r.returncode == 1 and "no cluster to read from" in r.stderr and "--kubeconfig" in r.stderr, r.stderr
    r = _lineage(cluster, "DataPile/pydocs", "-n", ns)
    assert r.returncode == 2 and "add --cluster" in r.stderr, r.stderr


@pytest.mark.parametrize("case", [c for c in CASES if c.api_server], ids=lambda c: c.id)
def test_bad_manifest_is_rejected_by_the_api_server(cluster: ControlPlane, crds, case: Case, request):
    ns = request.config.cache_ns if hasattr(request.config, "cache_ns") else None
    if ns is None:
        ns = request.config.cache_ns = _ns(cluster, "bad")
    r = cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(case.manifest()),
                        check=False)
    assert r.returncode != 0, f"accepted: {r.stdout}"
    assert case.api_server in r.stderr, r.stderr


def test_base_manifests_are_accepted(cluster: ControlPlane, crds):
    ns = _ns(cluster, "base")
    for doc in BASE.values():
        cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(doc))


@pytest.fixture(scope="module")
def rendered_chart() -> str:
    helm = build("helm") / "helm"
    r = subprocess.run([str(helm), "template", "fmforge", str(ROOT / "charts" / "fmforge"), "--namespace",
                        "fmforge-system", "--include-crds",
                        # as `helm install` renders it where KServe's CRDs are installed
                        "--api-versions", "serving.kserve.io/v1alpha1/ClusterServingRuntime"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_chart_is_accepted_by_a_server_dry_run(cluster: ControlPlane, crds, rendered_chart: str):
    cluster.kubectl("create", "namespace", "fmforge-system", check=False)
    r = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=rendered_chart)
    for kind in ("serviceaccount/", "clusterrole.rbac.authorization.k8s.io/", "configmap/", "service/",
                 "deployment.apps/", "customresourcedefinition.apiextensions.k8s.io/datapiles.fmforge.io",
                 "clusterservingruntime.serving.kserve.io/fmforge"):
        assert kind in r.stdout, r.stdout


def _pod_from_chart(rendered_chart: str) -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(rendered_chart) if d]
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    [sa] = [d for d in docs if d["kind"] == "ServiceAccount"]
    tpl = dep["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "fmforge-operator", "labels": tpl["metadata"]["labels"]}, "spec": tpl["spec"]}
    return pod, sa


def test_operator_pod_passes_pod_security_restricted(cluster: ControlPlane, crds, rendered_chart: str):
    ns = _ns(cluster, "pss", {"pod-security.kubernetes.io/enforce": "restricted",
                              "pod-security.kubernetes.io/enforce-version": "latest"})
    pod, sa = _pod_from_chart(rendered_chart)
    sa["metadata"]["namespace"] = ns
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sa))
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(pod), check=False)
    assert r.returncode == 0, r.stderr
    assert "violate" not in r.stderr.lower()
    # a deliberately privileged pod is rejected by Pod Security admission in the same namespace
    bad = json.loads(json.dumps(pod))
    c = bad["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0}
    bad["spec"]["securityContext"] = {}
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(bad), check=False)
    assert r.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in r.stderr and "privileged" in r.stderr


def _wait_gone(cluster: ControlPlane, *args: str, timeout: float = 90) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = cluster.kubectl("get", *args, check=False)
        if r.returncode != 0 and "NotFound" in r.stderr:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{args} still there after {timeout}s")


def test_owner_reference_garbage_collection(cluster: ControlPlane, crds):
    """A child built the way the operator builds it (kube.builders, with kube.names' name, labels
    and owner reference) is collected when its DataPile is deleted."""
    ns = _ns(cluster, "gc")
    cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(BASE["DataPile"]))
    pile = json.loads(cluster.kubectl("get", "datapile", "bad", "-n", ns, "-o", "json").stdout)
    child = plan_configmap(pile, {"kind": "DataPile"})
    assert child["metadata"]["name"] == "bad-g1-prepare"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(child))
    cluster.kubectl("delete", "datapile", "bad", "-n", ns, "--wait=false")
    took = _wait_gone(cluster, "configmap", "bad-g1-prepare", "-n", ns)
    print(f"child ConfigMap collected {took:.1f}s after its DataPile was deleted")


def test_namespace_deletion_removes_fmforge_objects(cluster: ControlPlane, crds):
    ns = _ns(cluster, "nsdel")
    cluster.kubectl("apply", "--server-side", "-n", ns, "-f", str(ROOT / "examples" / "quickstart"))
    objects = json.loads(cluster.kubectl("get", "fmforge", "-n", ns, "-o", "json").stdout)["items"]
    assert sorted(o["kind"] for o in objects) == sorted(KINDS)
    # Each with a child as the operator builds it: owner references must not hold the namespace up.
    for obj in objects:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(plan_configmap(obj, {"kind": obj["kind"]})))
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    _wait_gone(cluster, "namespace", ns)
