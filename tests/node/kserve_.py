"""KServe's controller on the node, installed as its own config/ installs it, in Standard
(RawDeployment) mode: no Knative, no Istio, no cert-manager.

- The binary: `cmd/manager` of github.com/kserve/kserve (build-controlplane.sh kserve), alone in
  a one-binary image (build-images.sh kserve), run as the Deployment `kserve-controller-manager`
  of the namespace `kserve` (config/manager/manager.yaml, without leader election: one replica).
- The CRDs of config/crd/full (the InferenceService, serving runtimes, TrainedModel,
  InferenceGraph, ClusterStorageContainer and the local-model kinds the controller reads), its
  ClusterRole (config/rbac/role.yaml), and its `inferenceservice-config` ConfigMap
  (config/configmap/inferenceservice.yaml) with two changes: Standard the default deployment
  mode, and no Ingress objects (there is no ingress controller; requests go to the predictor's
  Service, whose cluster name `<name>-predictor.<namespace>.svc.cluster.local` is the URL). The
  storage initializer's image stays as shipped and is never started: fmforge's models are on a
  claim, and `pvc://` storage URIs are mounted into the predictor, nothing is downloaded.
- Its webhooks (config/webhook/manifests.yaml: the InferenceService defaulter and validator, the
  pod mutator that mounts the model's claim, the serving-runtime validators) with a certificate
  made here in place of cert-manager's: a CA of its own that signs the serving certificate of
  `kserve-webhook-server-service.kserve.svc`, the CA in every webhook's caBundle. The API server
  (a host process) reaches the Service's ClusterIP through kube-proxy's rules.
"""

from __future__ import annotations

import base64
import copy
import json
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cluster"))
from controlplane import KSERVE_MODULE, _cert, _name, _pem_key, module_dir  # noqa: E402

KSERVE_VERSION = "v0.17.0"
KSERVE_NS = "kserve"
KSERVE_IMAGE = f"localhost/fmforge/kserve-controller:{KSERVE_VERSION}"
WEBHOOK_SERVICE = "kserve-webhook-server-service"
CERT_SECRET = "kserve-webhook-server-cert"
#: config/crd/full, less the LLMInferenceService kinds (their controller is cmd/llmisvc, not run)
CRD_FILES = ("serving.kserve.io_inferenceservices.yaml", "serving.kserve.io_servingruntimes.yaml",
             "serving.kserve.io_clusterservingruntimes.yaml", "serving.kserve.io_trainedmodels.yaml",
             "serving.kserve.io_inferencegraphs.yaml",
             "clusterstoragecontainer/serving.kserve.io_clusterstoragecontainers.yaml",
             "localmodel/serving.kserve.io_localmodelcaches.yaml",
             "localmodel/serving.kserve.io_localmodelnodegroups.yaml",
             "localmodel/serving.kserve.io_localmodelnodes.yaml")


def config_dir() -> Path:
    return module_dir(KSERVE_MODULE, KSERVE_VERSION) / "config"


def crd_paths() -> list[Path]:
    return [config_dir() / "crd" / "full" / f for f in CRD_FILES]


def webhook_certificate(workdir: Path) -> tuple[bytes, bytes, bytes]:
    """(CA, serving certificate, its key) in PEM for the webhook Service's names: what
    cert-manager's Certificate `serving-cert` of config/certmanager makes in a real install."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("kserve-webhook-ca")
    ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    svc = f"{WEBHOOK_SERVICE}.{KSERVE_NS}"
    cert = _cert(_name(f"{svc}.svc"), ca_name, key.public_key(), ca_key, ca=False,
                 sans=[x509.DNSName(n) for n in (WEBHOOK_SERVICE, svc, f"{svc}.svc", f"{svc}.svc.cluster.local")],
                 usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    out = (pem(ca), pem(cert), _pem_key(key))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kserve-webhook-ca.crt").write_bytes(out[0])
    return out


def inferenceservice_config() -> dict:
    """KServe's `inferenceservice-config`, as shipped, with the node's two changes."""
    cm = yaml.safe_load((config_dir() / "configmap" / "inferenceservice.yaml").read_text())
    data = cm["data"]
    deploy = json.loads(data["deploy"])
    deploy["defaultDeploymentMode"] = "Standard"
    data["deploy"] = json.dumps(deploy, indent=1)
    ingress = json.loads(data["ingress"])
    ingress["disableIngressCreation"] = True
    # the InferenceService's URL is its predictor Service's cluster name, which is what serves it
    ingress["ingressDomain"] = "svc.cluster.local"
    ingress["domainTemplate"] = "{{ .Name }}-predictor.{{ .Namespace }}.{{ .IngressDomain }}"
    data["ingress"] = json.dumps(ingress, indent=1)
    cm["metadata"] = {"name": "inferenceservice-config", "namespace": KSERVE_NS}
    return cm


def webhooks(ca_pem: bytes) -> list[dict]:
    """config/webhook/manifests.yaml with the Service's name and namespace that kustomize's
    replacements put in, and the CA that cert-manager's CA injector would."""
    bundle = base64.b64encode(ca_pem).decode()
    out = []
    for doc in yaml.safe_load_all((config_dir() / "webhook" / "manifests.yaml").read_text()):
        if not doc:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"].pop("creationTimestamp", None)
        for hook in doc["webhooks"]:
            hook["clientConfig"]["service"].update(name=WEBHOOK_SERVICE, namespace=KSERVE_NS)
            hook["clientConfig"]["caBundle"] = bundle
        out.append(doc)
    return out


def manifests(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> list[dict]:
    """Everything but the CRDs and the namespace, in the order to apply them."""
    meta = {"name": "kserve-controller-manager", "namespace": KSERVE_NS}
    role = yaml.safe_load((config_dir() / "rbac" / "role.yaml").read_text())
    labels = {"control-plane": "kserve-controller-manager", "app.kubernetes.io/name": "kserve-controller-manager"}
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kserve-manager-rolebinding"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
         "subjects": [{"kind": "ServiceAccount", "name": meta["name"], "namespace": KSERVE_NS}]},
        inferenceservice_config(),
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": {"name": CERT_SECRET, "namespace": KSERVE_NS},
         "data": {"tls.crt": b64(cert_pem), "tls.key": b64(key_pem), "ca.crt": b64(ca_pem)}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": WEBHOOK_SERVICE, "namespace": KSERVE_NS},
         "spec": {"ports": [{"port": 443, "targetPort": "webhook-server"}],
                  "selector": {"control-plane": "kserve-controller-manager"}}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"control-plane": "kserve-controller-manager"}},
                  "template": {
             "metadata": {"labels": labels},
             "spec": {
                 "serviceAccountName": meta["name"],
                 "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                 "terminationGracePeriodSeconds": 10,
                 "containers": [{
                     "name": "manager", "image": KSERVE_IMAGE, "imagePullPolicy": "Never",
                     "command": ["/manager"],
                     "args": ["--metrics-addr=:8080", "--health-probe-addr=:8081"],
                     "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                             {"name": "SECRET_NAME", "value": CERT_SECRET}],
                     "ports": [{"containerPort": 9443, "name": "webhook-server", "protocol": "TCP"}],
                     "resources": {"requests": {"cpu": "10m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                     "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8081}, "periodSeconds": 2},
                     "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8081}, "periodSeconds": 10,
                                       "failureThreshold": 5},
                     "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
                     "volumeMounts": [{"name": "cert", "mountPath": "/tmp/k8s-webhook-server/serving-certs",
                                       "readOnly": True}],
                 }],
                 "volumes": [{"name": "cert", "secret": {"secretName": CERT_SECRET}}],
             }}}},
    ]
