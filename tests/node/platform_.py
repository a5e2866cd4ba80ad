"""fmforge installed on the real node as a user installs it: the CRDs and the chart with helm (the
operator as the chart's pod, from the operator image, and the chart's `fmforge`
ClusterServingRuntime), KubeRay's operator and KServe's controller (tests/node/kserve_.py) as pods
from their own images, OpenShift's arbitrary UIDs, and a work namespace with its
PersistentVolumeClaim.

- OpenShift's restricted-v2 SCC gives every pod of a namespace a UID from the namespace's range
  and GID 0. Here a MutatingAdmissionPolicy (CEL, in the API server) does the same for the
  namespaces labelled `fmforge.io/arbitrary-uid: "true"`: runAsUser and fsGroup 1000870000;
  Pod Security `restricted` is enforced there too (PodSecurity admission validates after the
  mutation, as OpenShift's SCC admission runs before it).
- Storage: a hostPath PersistentVolume (the node's directory `pv/`) bound to the claim
  `fmforge-data` of the work namespace; the chart's storage, catalog and warehouse live on it,
  and so does the corpus the DataPiles read (`pvc://fmforge-data/corpus/`) and the quickstart's
  tuning pairs and eval questions (`pvc://fmforge-data/quickstart/`), group 0 and group-writable
  as OpenShift volumes are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "cluster"))
import kserve_ as K  # noqa: E402
import node as N  # noqa: E402
from controlplane import KUBERAY_MODULE, KUBERAY_VERSION, ROOT, module_dir  # noqa: E402

UID = 1000870000
RELEASE_NS = "fmforge-system"
RAY_NS = "ray-system"
WORK_NS = "fmforge-work"
CLAIM = "fmforge-data"
KUBERAY_IMAGE = f"localhost/fmforge/kuberay-operator:{KUBERAY_VERSION}"


def arbitrary_uid_policy(api: str) -> list[dict]:
    """What OpenShift's SCC admission does to a pod in a restricted-v2 namespace, as a
    MutatingAdmissionPolicy: a UID (and fsGroup) from the namespace's range, the image's USER
    ignored; the primary group is 0 because the UID has no entry in the image's /etc/passwd."""
    return [
        {"apiVersion": api, "kind": "MutatingAdmissionPolicy", "metadata": {"name": "fmforge-arbitrary-uid"},
         "spec": {
             "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                     "operations": ["CREATE"], "resources": ["pods"]}]},
             "failurePolicy": "Fail", "reinvocationPolicy": "Never",
             "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": (
                 f"Object{{spec: Object.spec{{securityContext: Object.spec.securityContext{{"
                 f"runAsUser: {UID}, fsGroup: {UID}}}}}}}")}}]}},
        {"apiVersion": api, "kind": "MutatingAdmissionPolicyBinding", "metadata": {"name": "fmforge-arbitrary-uid"},
         "spec": {"policyName": "fmforge-arbitrary-uid",
                  "matchResources": {"namespaceSelector": {"matchLabels": {"fmforge.io/arbitrary-uid": "true"}}}}},
    ]


def kuberay_manifests() -> list[dict]:
    """KubeRay's operator as its own config/ deploys it: its ServiceAccount, its ClusterRole
    (config/rbac/role.yaml of the module), and a Deployment of the image with the binary."""
    role = yaml.safe_load((module_dir(KUBERAY_MODULE, KUBERAY_VERSION) / "config" / "rbac" / "role.yaml").read_text())
    role["metadata"] = {"name": "kuberay-operator"}
    meta = {"name": "kuberay-operator", "namespace": RAY_NS}
    labels = {"app.kubernetes.io/name": "kuberay-operator"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kuberay-operator"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kuberay-operator"},
         "subjects": [{"kind": "ServiceAccount", "name": "kuberay-operator", "namespace": RAY_NS}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {
                 "serviceAccountName": "kuberay-operator",
                 "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{
                     "name": "kuberay-operator", "image": KUBERAY_IMAGE, "imagePullPolicy": "Never",
                     "args": ["--enable-leader-election=false", "--metrics-addr=:8080",
                              "--health-probe-bind-address=:8082"],
                     "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                     "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8082}, "periodSeconds": 2},
                     "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}},
                 }]}}}},
    ]


def install_kserve(node: N.Node) -> None:
    """KServe's controller, then its webhooks once it serves them (they fail closed: a webhook
    configured before its server is up refuses every InferenceService and serving runtime)."""
    ca, cert, key = K.webhook_certificate(node.workdir / "kserve")
    _apply(node, K.manifests(ca, cert, key))
    r = node.kubectl("rollout", "status", "deployment/kserve-controller-manager", "-n", K.KSERVE_NS,
                     "--timeout=180s", check=False)
    if r.returncode:
        raise RuntimeError("KServe's controller did not become ready:\n"
                           + node.kubectl("get", "pods", "-n", K.KSERVE_NS, "-o", "wide", check=False).stdout
                           + node.kubectl("logs", "-n", K.KSERVE_NS, "deployment/kserve-controller-manager",
                                          "--tail=40", check=False).stdout)
    _apply(node, K.webhooks(ca))
    # The API server reaches the webhook through the Service's ClusterIP (kube-proxy's rules on the
    # host): a server-side dry run of an InferenceService goes through the defaulter and validator.
    probe = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
             "metadata": {"name": "webhook-probe", "namespace": K.KSERVE_NS},
             "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "pvc://none/x"}}}}
    def answered() -> bool:
        r = node.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        if r.returncode:
            raise RuntimeError(r.stderr.strip())  # what wait_for reports if it never answers
        return True
    node.wait_for("KServe's webhooks to answer the API server", answered, timeout=120)


@dataclass
class Platform:
    node: N.Node
    pv_dir: Path
    timings: dict[str, float]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.node.kubectl(*args, input=input, check=check)


def _apply(node: N.Node, docs: list[dict], *args: str) -> None:
    node.kubectl("apply", "--server-side", *args, "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def _namespace(node: N.Node, name: str) -> None:
    _apply(node, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "restricted", "fmforge.io/arbitrary-uid": "true"}}}])


def _served(node: N.Node, resource: str, group: str) -> str:
    """The preferred served version of `resource` in `group`, as group/version."""
    info = json.loads(node.kubectl("get", "--raw", f"/apis/{group}").stdout)
    versions = [info["preferredVersion"]] + [v for v in info["versions"] if v != info["preferredVersion"]]
    for v in versions:
        res = json.loads(node.kubectl("get", "--raw", f"/apis/{v['groupVersion']}").stdout)["resources"]
        if any(r["name"] == resource for r in res):
            return v["groupVersion"]
    raise RuntimeError(f"{resource}.{group} is not served (versions {[v['groupVersion'] for v in versions]})")


def install(node: N.Node, corpus_files: int | None = 30) -> Platform:
    """Install everything on a started node; the work namespace's claim holds a small corpus
    (`corpus_files` files of each kind; None: the quickstart's whole corpus)."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    helm = N.build("helm") / "helm"
    node.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    bases = module_dir(KUBERAY_MODULE, KUBERAY_VERSION) / "config" / "crd" / "bases"
    for crd in ("rayjobs", "rayclusters", "rayservices"):
        node.kubectl("apply", "--server-side", "-f", str(bases / f"ray.io_{crd}.yaml"))
    for path in K.crd_paths():
        node.kubectl("apply", "--server-side", "-f", str(path))
    for crd in ("rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io", "inferenceservices.serving.kserve.io",
                "clusterservingruntimes.serving.kserve.io"):
        node.wait_for(f"crd {crd}", lambda c=crd: node.kubectl(
            "wait", "--for=condition=Established", f"crd/{c}", "--timeout=5s", check=False).returncode == 0)
    _apply(node, arbitrary_uid_policy(_served(node, "mutatingadmissionpolicies", "admissionregistration.k8s.io")))
    for ns in (RELEASE_NS, RAY_NS, K.KSERVE_NS, WORK_NS):
        _namespace(node, ns)
    timings["crds, policy, namespaces"] = time.monotonic() - t

    t = time.monotonic()
    install_kserve(node)
    timings["KServe"] = time.monotonic() - t

    t = time.monotonic()
    _apply(node, kuberay_manifests())
    pv_dir = node.workdir / "pv"
    pv_dir.mkdir(exist_ok=True)
    corpus = pv_dir / "corpus"
    args = [sys.executable, str(ROOT / "examples" / "quickstart" / "build-corpus.py"), "--out", str(corpus)]
    if corpus_files:
        args += ["--max-files", str(corpus_files)]
    subprocess.run(args, check=True, capture_output=True)
    # The quickstart's tuning pairs and eval questions (examples/quickstart/node reads them here).
    for sub in ("tuning", "evals"):
        shutil.copytree(ROOT / "examples" / "quickstart" / sub, pv_dir / "quickstart" / sub, dirs_exist_ok=True)
    # As OpenShift's volumes are: group 0, group-writable, whatever UID the pods get.
    subprocess.run(["chgrp", "-R", "0", str(pv_dir)], check=True)
    subprocess.run(["chmod", "-R", "g+rwX", str(pv_dir)], check=True)
    timings["corpus"] = time.monotonic() - t

    t = time.monotonic()
    _apply(node, [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{WORK_NS}-{CLAIM}"},
         "spec": {"capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "hostPath": {"path": str(pv_dir), "type": "Directory"},
                  "claimRef": {"namespace": WORK_NS, "name": CLAIM}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM, "namespace": WORK_NS},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{WORK_NS}-{CLAIM}",
                  "resources": {"requests": {"storage": "20Gi"}}}},
    ])
    values = {
        "image": {"repository": N.OPERATOR_IMAGE.rsplit(":", 1)[0], "tag": N.OPERATOR_IMAGE.rsplit(":", 1)[1],
                  "pullPolicy": "IfNotPresent"},
        "logFormat": "plain",
        "resources": {"requests": {"cpu": "10m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "config": {
            "runtimeImage": N.RUNTIME_IMAGE,
            "storageUri": f"pvc://{CLAIM}/artifacts/",
            "catalog": {"type": "sql", "uri": f"sqlite:////mnt/pvc/{CLAIM}/catalog.db",
                        "warehouse": f"pvc://{CLAIM}/warehouse"},
            "resyncSeconds": 30,
            # A 2-core node: the head (driver only) with 400m, one worker with one CPU. Two Ray
            # clusters start at once in the quickstart (the pile and the tuning): their heads
            # must leave a whole CPU for one worker, or both wait for ever (at 500m they did).
            "jobs": {"headCpu": "400m", "ttlSecondsAfterFinished": 0, "backoffLimit": 0},
        },
        # KServe's CRDs are there: the chart's ClusterServingRuntime `fmforge` (the runtime image).
        "servingRuntime": {"create": True},
    }
    vfile = node.workdir / "values.yaml"
    vfile.write_text(yaml.safe_dump(values))
    r = subprocess.run([str(helm), "upgrade", "--install", "fmforge", str(ROOT / "charts" / "fmforge"),
                        "-n", RELEASE_NS, "--kubeconfig", str(node.kubeconfig), "-f", str(vfile), "--wait",
                        "--timeout", "180s"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"helm install failed:\n{r.stdout}\n{r.stderr}\n"
                           + node.kubectl("get", "pods", "-A", "-o", "wide").stdout
                           + node.kubectl("logs", "-n", RELEASE_NS, "deployment/fmforge", "--tail=40",
                                          check=False).stdout
                           + node.kubectl("logs", "-n", RELEASE_NS, "deployment/fmforge", "--tail=40",
                                          "--previous", check=False).stdout)
    node.kubectl("rollout", "status", "deployment/kuberay-operator", "-n", RAY_NS, "--timeout=120s")
    node.wait_for("the claim Bound", lambda: node.kubectl(
        "get", "pvc", CLAIM, "-n", WORK_NS, "-o", "jsonpath={.status.phase}").stdout == "Bound", timeout=60)
    timings["chart, KubeRay, claim"] = time.monotonic() - t
    return Platform(node, pv_dir, timings)
