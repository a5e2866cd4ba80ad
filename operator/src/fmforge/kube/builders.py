"""Manifests of the children fmforge creates: RayJob, InferenceService, OpenShift Route, the plan
ConfigMap, the stage's ServiceAccount and Role, and Events.

Pure functions from an fmforge object (wire form) and the operator settings to a manifest dict;
the reconcilers call them and the unit tests compare their output field by field. Everything
that runs a pod is rendered for OpenShift's restricted-v2 SCC and the Pod Security Standard
`restricted`: non-root with no fixed UID, no privilege escalation, every capability dropped,
the runtime's default seccomp profile, no hostPath, no port below 1024.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from ..api.status import now
from ..api.v1alpha1 import KINDS, RayResources
from ..api.v1alpha1.common import WORKER_SLOT
from .names import ANNOTATION_MODEL_DIGEST, child_name_for, labels, owner_reference
from .settings import Settings

PLAN_DIR = "/etc/fmforge/plan"
PLAN_FILE = f"{PLAN_DIR}/plan.json"
PVC_ROOT = "/mnt/pvc"
#: Where the ConfigMaps a spec names (a TunedModel's data.configMap) are mounted, one folder each.
CONFIGMAP_ROOT = "/etc/fmforge/configmaps"
STAGE_SERVICE_ACCOUNT = "fmforge-stage"
STAGE_FIELD_MANAGER = "fmforge-stage"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ENTRYPOINT = f"python -m fmforge.runtime.job --plan {PLAN_FILE}"

POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _meta(obj: dict[str, Any], name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    m = obj["metadata"]
    return {
        "name": name,
        "namespace": m["namespace"],
        "labels": {**labels(obj["kind"], m["name"], m["generation"]), **(extra_labels or {})},
        "ownerReferences": [owner_reference(obj)],
    }


# -- storage ----------------------------------------------------------------------------------------

_PVC = re.compile(r"pvc://([a-z0-9]([-a-z0-9]*[a-z0-9])?)(/|$)")


def pvc_path(uri: str) -> str:
    """The path a pvc://CLAIM/PATH URI has inside a Ray pod (each claim is mounted under /mnt/pvc)."""
    return f"{PVC_ROOT}/{uri.removeprefix('pvc://')}".rstrip("/")


def claims(*texts: str) -> list[str]:
    """The PersistentVolumeClaims named by pvc:// URIs in `texts`, sorted, each once."""
    return sorted({m.group(1) for t in texts for m in _PVC.finditer(t)})


def catalog_properties(settings: Settings) -> dict[str, str]:
    """$FMFORGE_CATALOG of the stage: the pyiceberg properties, with pvc:// made a local path."""
    c = settings.catalog
    warehouse = c.warehouse
    if warehouse.startswith("pvc://"):
        warehouse = "file://" + pvc_path(warehouse)
    return {"type": c.type, "uri": c.uri, "warehouse": warehouse, **c.properties}


def storage_root(settings: Settings) -> str:
    """The storage URI as a directory of the Ray pods: a mounted claim (pvc://), a path every
    pod shares (file://, such as an NFS mount in the image); s3:// has no directory yet, so
    artifacts stay in the pod's scratch space."""
    uri = settings.storage_uri
    if uri.startswith("pvc://"):
        return pvc_path(uri)
    if uri.startswith("file://"):
        return uri.removeprefix("file://").rstrip("/")
    return "/tmp/fmforge"


def artifacts_dir(settings: Settings, obj: dict[str, Any]) -> str:
    """Where an attempt writes its artifacts inside the Ray pods."""
    m = obj["metadata"]
    return f"{storage_root(settings)}/{m['namespace']}/{obj['kind'].lower()}/{m['name']}/g{m['generation']}"


def spec_config_maps(obj: dict[str, Any]) -> list[str]:
    """The ConfigMaps the stage of `obj` reads: a TunedModel's `data.configMap`. Stages never
    talk to the API server, so these are mounted into the Ray pods and read as files."""
    if obj["kind"] != "TunedModel":
        return []
    name = ((obj["spec"].get("data") or {}).get("configMap") or {}).get("name")
    return [name] if name else []


def config_map_dir(name: str) -> str:
    """The folder a spec's ConfigMap is mounted at in the Ray pods (one file per key)."""
    return f"{CONFIGMAP_ROOT}/{name}"


# -- the plan ---------------------------------------------------------------------------------------


def plan(obj: dict[str, Any], settings: Settings, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The resolved spec `python -m fmforge.runtime.job` runs: references replaced by the
    producers' statuses (URIs, snapshot ids, digests) as they were when the attempt started."""
    m = obj["metadata"]
    info = KINDS[obj["kind"]]
    root = storage_root(settings)
    return {
        "kind": obj["kind"],
        "name": m["name"],
        "namespace": m["namespace"],
        "generation": m["generation"],
        "uid": m["uid"],
        "spec": obj["spec"],
        # A ModelCard's approval annotations, as they were when the attempt started: the card the
        # stage renders says who approved. The operator decides the approval again afterwards.
        "annotations": {k: v for k, v in (m.get("annotations") or {}).items() if k.startswith("fmforge.io/")},
        "inputs": inputs,
        "artifacts": artifacts_dir(settings, obj),
        "stateDir": f"{root}/state",
        "baseDir": root,
        "configMaps": {n: config_map_dir(n) for n in spec_config_maps(obj)},
        # Where the stage reports progress and results: its own object's status subresource,
        # with a field manager of its own (server-side apply), through the pod's ServiceAccount.
        "status": {
            "path": f"/apis/fmforge.io/v1alpha1/namespaces/{m['namespace']}/{info.plural}/{m['name']}/status",
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "fieldManager": STAGE_FIELD_MANAGER,
        },
    }


def plan_configmap(obj: dict[str, Any], the_plan: dict[str, Any]) -> dict[str, Any]:
    """The ConfigMap the Ray pods mount the plan from; named like the RayJob."""
    name = child_name_for(obj["kind"], obj["metadata"]["name"], obj["metadata"]["generation"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(obj, name),
            "data": {"plan.json": json.dumps(the_plan, indent=2, sort_keys=True)}}


# -- RayJob -----------------------------------------------------------------------------------------


def _container(name: str, image: str, resources: dict[str, Any], env: list[dict[str, Any]],
               env_from: list[dict[str, Any]], mounts: list[dict[str, Any]],
               ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": image, "resources": resources, "env": env,
                         "volumeMounts": mounts, "securityContext": CONTAINER_SECURITY}
    if env_from:
        c["envFrom"] = env_from
    if ports:
        c["ports"] = ports
    return c


def rayjob(obj: dict[str, Any], settings: Settings, resources: RayResources, queue: str = "") -> dict[str, Any]:
    """The KubeRay RayJob (ray.io/v1) that runs the stage of `obj` with its plan."""
    m = obj["metadata"]
    name = child_name_for(obj["kind"], m["name"], m["generation"])
    queue = queue or settings.queue
    pvcs = claims(settings.storage_uri, settings.catalog.warehouse, json.dumps(obj["spec"]))
    volumes: list[dict[str, Any]] = [
        {"name": "plan", "configMap": {"name": name}},
        # Ray writes its session files under /tmp; the image's root filesystem stays read-only.
        {"name": "tmp", "emptyDir": {}},
    ] + [{"name": f"pvc-{c}", "persistentVolumeClaim": {"claimName": c}} for c in pvcs]
    mounts = [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}] + [
        {"name": f"pvc-{c}", "mountPath": f"{PVC_ROOT}/{c}"} for c in pvcs
    ]
    # Numbered volume names: a ConfigMap's name may be longer than a volume name may be.
    for i, cm in enumerate(spec_config_maps(obj)):
        volumes.append({"name": f"configmap-{i}", "configMap": {"name": cm}})
        mounts.append({"name": f"configmap-{i}", "mountPath": config_map_dir(cm), "readOnly": True})
    env = [
        {"name": "FMFORGE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "FMFORGE_CATALOG", "value": json.dumps(catalog_properties(settings), sort_keys=True)},
        {"name": "HOME", "value": "/tmp"},
        # Task results always in the object store, never in the driver's memory (raysession.start
        # sets the same locally).
        {"name": "RAY_max_direct_call_object_size", "value": "0"},
    ]
    env_from = [{"secretRef": {"name": settings.storage_secret}}] if settings.storage_secret else []
    worker_res: dict[str, Any] = {"cpu": str(resources.cpus_per_worker), "memory": resources.memory}
    if resources.gpus_per_worker:
        worker_res["nvidia.com/gpu"] = str(resources.gpus_per_worker)

    def pod(container: dict[str, Any]) -> dict[str, Any]:
        return {"spec": {"serviceAccountName": STAGE_SERVICE_ACCOUNT, "securityContext": POD_SECURITY,
                         "volumes": volumes, "containers": [container]}}

    head = _container(
        "ray-head", settings.runtime_image,
        # The head runs the driver (the entrypoint), which schedules and commits metadata only.
        {"requests": {"cpu": settings.jobs.head_cpu, "memory": resources.memory},
         "limits": {"cpu": settings.jobs.head_cpu, "memory": resources.memory}},
        env, env_from, mounts,
        ports=[{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
               {"name": "client", "containerPort": 10001}],
    )
    worker = _container("ray-worker", settings.runtime_image, {"requests": worker_res, "limits": worker_res},
                        env, env_from, mounts)
    submitter = {
        "spec": {
            "restartPolicy": "Never",
            # `ray job submit` needs no API access.
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [{"name": "ray-job-submitter", "image": settings.runtime_image,
                            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                          "limits": {"cpu": "1", "memory": "512Mi"}},
                            "env": [{"name": "HOME", "value": "/tmp"}],
                            "securityContext": CONTAINER_SECURITY}],
        }
    }
    # The head schedules and runs the driver, no tasks, except for a TrainingRun: Ray Train's
    # workers hold the workers' CPUs for the whole run, and the Ray Data tasks that feed them
    # need one more, or they wait for ever (the local run starts Ray with one CPU more for the
    # same reason, fmforge.stages.train). The head's one logical CPU is that one.
    head_cpus = "1" if obj["kind"] == "TrainingRun" else "0"
    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": settings.jobs.ttl_seconds_after_finished,
        "backoffLimit": settings.jobs.backoff_limit,
        "submitterPodTemplate": submitter,
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {"num-cpus": head_cpus}, "template": pod(head)},
            "workerGroupSpecs": [{
                "groupName": "workers",
                "replicas": resources.workers,
                "minReplicas": resources.workers,
                "maxReplicas": resources.workers,
                "rayStartParams": {},
                # KubeRay passes these to `ray start --resources` (v1.5's group `resources`).
                "resources": {WORKER_SLOT: "1"},
                "template": pod(worker),
            }],
        },
    }
    if settings.jobs.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = settings.jobs.active_deadline_seconds
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": _meta(obj, name, {QUEUE_LABEL: queue} if queue else None), "spec": spec}


# -- the stage's own identity -----------------------------------------------------------------------


def stage_rbac(namespace: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding with which a stage patches its own object's status
    (progress and results) in `namespace`: get and patch of the status subresources, nothing else."""
    meta = {"name": STAGE_SERVICE_ACCOUNT, "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "fmforge", "app.kubernetes.io/component": "stage"}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [{"apiGroups": ["fmforge.io"], "resources": sorted(f"{k.plural}/status" for k in KINDS.values()),
                    "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": STAGE_SERVICE_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": STAGE_SERVICE_ACCOUNT, "namespace": namespace}]},
    ]


# -- InferenceService -------------------------------------------------------------------------------


#: The ClusterServingRuntime the chart installs (charts/fmforge/templates/servingruntime.yaml).
SERVING_RUNTIME = "fmforge"


def serving_uri(uri: str) -> str:
    """The model's URI as KServe reads it. A stage in a Ray pod reports a model on a claim as
    the path it has there (file:///mnt/pvc/CLAIM/PATH); KServe mounts a claim only for a
    pvc://CLAIM/PATH storage URI (and has no file:// at all), so that is what it is given back."""
    prefix = f"file://{PVC_ROOT}/"
    if uri.startswith(prefix) and "/" in uri.removeprefix(prefix).strip("/"):
        return "pvc://" + uri.removeprefix(prefix)
    return uri


def inference_service(obj: dict[str, Any], spec: Any, model_uri: str, model_digest: str | None,
                      settings: Settings) -> dict[str, Any]:
    """The KServe InferenceService (serving.kserve.io/v1beta1) of a Deployment with target kserve.

    It is named like the Deployment, not per generation: a new generation updates it in place,
    which is what lets KServe split traffic between the previous and the new model revision
    (`canaryTrafficPercent`) and keeps the endpoint's URL stable.

    `runtime: huggingface` is KServe's Hugging Face runtime (`model` with its format);
    `runtime: fmforge` is fmforge's predictor (`fmforge.stages.deploy.predictor`, in the runtime
    image) through the chart's ClusterServingRuntime `fmforge`, given the approved digest: it
    refuses model files that are not those bytes. Either way the model is the `storageUri`: a
    pvc:// one is mounted at /mnt/models as it is (nothing copied), an s3:// one is fetched there
    by KServe's storage initializer."""
    ks = spec.kserve
    res: dict[str, Any] = {"cpu": ks.resources.cpu, "memory": ks.resources.memory}
    if ks.resources.gpu:
        res["nvidia.com/gpu"] = str(ks.resources.gpu)
    name = obj["metadata"]["name"]
    predictor: dict[str, Any] = {"minReplicas": ks.min_replicas, "maxReplicas": ks.max_replicas,
                                 "securityContext": POD_SECURITY}
    if ks.runtime == "fmforge":
        predictor["model"] = {
            "modelFormat": {"name": "fmforge"},
            "runtime": SERVING_RUNTIME,
            "storageUri": serving_uri(model_uri),
            # appended to the runtime's args by KServe
            "args": ["--model-digest", model_digest] if model_digest else [],
            "resources": {"requests": res, "limits": res},
            "securityContext": CONTAINER_SECURITY,
        }
    else:
        predictor["model"] = {
            "modelFormat": {"name": "huggingface"},
            "protocolVersion": "v2" if ks.protocol == "v2" else "v1",
            "storageUri": serving_uri(model_uri),
            "args": [f"--model_name={name}"],
            "resources": {"requests": res, "limits": res},
            "securityContext": CONTAINER_SECURITY,
        }
    if ks.canary_traffic_percent:
        predictor["canaryTrafficPercent"] = ks.canary_traffic_percent
    meta = _meta(obj, name)
    meta["annotations"] = {ANNOTATION_MODEL_DIGEST: model_digest or ""}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}


def route(obj: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The OpenShift Route (route.openshift.io/v1) of a Deployment with `expose: route`.

    Named like the Deployment and its InferenceService; it sends traffic to the predictor's
    Service, which KServe names `<name>-predictor` in RawDeployment mode. No host is set: the
    router gives one from the cluster's domain (and choosing a host needs the `routes/custom-host`
    permission the operator does not have). With `routeTls: edge` the router terminates TLS and
    redirects plain HTTP, so the model is never served unencrypted outside the cluster."""
    name = obj["metadata"]["name"]
    route_spec: dict[str, Any] = {"to": {"kind": "Service", "name": f"{name}-predictor", "weight": 100}}
    if spec.kserve.route_tls == "edge":
        route_spec["tls"] = {"termination": "edge", "insecureEdgeTerminationPolicy": "Redirect"}
    return {"apiVersion": "route.openshift.io/v1", "kind": "Route", "metadata": _meta(obj, name), "spec": route_spec}


# -- Events -----------------------------------------------------------------------------------------

_INSTANCE = os.environ.get("HOSTNAME") or socket.gethostname()


def event(obj: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about `obj` (`kubectl describe` and `kubectl get events` show it)."""
    m = obj["metadata"]
    ts = now()
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{m['name']}.", "namespace": m["namespace"]},
        "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": m["name"],
                           "namespace": m["namespace"], "uid": m["uid"]},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": "fmforge-operator"},
        "reportingComponent": "fmforge.io/operator", "reportingInstance": _INSTANCE[:128],
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
    }
