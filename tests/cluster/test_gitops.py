"""examples/gitops against a real kube-apiserver with Argo CD's real Application CRD.

The Kustomize base is rendered with `kubectl kustomize` (kubectl embeds sigs.k8s.io/kustomize/api,
the library of the kustomize binary Argo CD runs) and the operator's Application with `helm
template` the way Argo CD renders a Helm source; both are applied server-side with strict field validation, so a field
the CRDs do not know fails instead of being pruned. Argo CD's Application CRD comes from its
published Go module (tests/argocd.py names the release); a stand-in is used only where the
module is not served, and the run says so. The chart's argocd-cm snippet is merged into an
argocd-cm with the commands examples/gitops/README.md gives.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
import warnings

import pytest
import yaml
from argocd import ARGOCD_MODULE, ARGOCD_VERSION, KINDS, script
from controlplane import ROOT, ControlPlane, module_dir
from tools import build, standin_note, unavailable

from fmforge.api.v1alpha1 import kind_info

GITOPS = ROOT / "examples" / "gitops"
PIPELINE = GITOPS / "pipeline"
APPS = GITOPS / "applications"
WAVE = "argocd.argoproj.io/sync-wave"
STANDIN = """apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: applications.argoproj.io, labels: {fmforge.io/stand-in: "true"}}
spec:
  group: argoproj.io
  names: {kind: Application, plural: applications, singular: application, listKind: ApplicationList}
  scope: Namespaced
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def _ns(cluster: ControlPlane, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    return name


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def application_crd(cluster: ControlPlane, crds) -> str:
    """Argo CD's Application CRD installed; where it came from."""
    try:
        path = module_dir(ARGOCD_MODULE, ARGOCD_VERSION) / "manifests" / "crds" / "application-crd.yaml"
        cluster.kubectl("apply", "--server-side", "-f", str(path))
        origin = f"{ARGOCD_MODULE}@{ARGOCD_VERSION} manifests/crds/application-crd.yaml (real)"
    except RuntimeError as e:
        warnings.warn(standin_note("Argo CD Application CRD", ARGOCD_MODULE, ARGOCD_VERSION, e), stacklevel=1)
        cluster.kubectl("apply", "--server-side", "-f", "-", input=STANDIN)
        origin = "stand-in"
    # Served once established and discovered: a list succeeds only then.
    deadline = time.monotonic() + 60
    while cluster.kubectl("get", "applications.argoproj.io", "-A", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the Application resource never became servable"
        time.sleep(0.5)
    print(f"\nArgo CD Application CRD: {origin}")
    return origin


@pytest.fixture(scope="module")
def pipeline(cluster: ControlPlane) -> list[dict]:
    """The Kustomize base, rendered."""
    return _docs(cluster.kubectl("kustomize", str(PIPELINE)).stdout)


def test_pipeline_base_is_the_quickstart():
    for f in sorted(PIPELINE.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        quickstart = ROOT / "examples" / "quickstart" / f.name
        assert f.read_text() == quickstart.read_text(), f"copy it again: cp {quickstart} {f}"
    names = {f.name for f in PIPELINE.glob("*.yaml")} - {"kustomization.yaml"}
    assert names == {f.name for f in (ROOT / "examples" / "quickstart").glob("*.yaml")}


def test_sync_waves_follow_the_pipeline_graph(pipeline: list[dict]):
    """Every producer is in an earlier wave than its consumers (the references of the API models);
    ModelCard and Deployment share the last wave, so a ModelCard waiting for approval cannot
    hold the sync that would bring its approval."""
    waves = {(d["kind"], d["metadata"]["name"]): int(d["metadata"]["annotations"][WAVE]) for d in pipeline}
    assert sorted(k for k, _ in waves) == sorted(KINDS)
    edges = 0
    for d in pipeline:
        info = kind_info(d["kind"])
        for ref in info.references(info.spec.model_validate(d["spec"])):
            edges += 1
            assert waves[(ref.kind, ref.name)] < waves[(d["kind"], d["metadata"]["name"])], (ref, d["kind"])
    # pile -> run, tuned -> card, tuned -> deployment: the tuned model starts from a pretrained
    # model shipped in a package, not from the TrainingRun (whose card is examples/pretrain)
    assert edges >= 3
    last = max(waves.values())
    assert {k for (k, _), w in waves.items() if w == last} == {"ModelCard", "Deployment"}


def test_kustomize_changes_nothing_but_the_waves(pipeline: list[dict]):
    for d in copy.deepcopy(pipeline):
        quickstart = yaml.safe_load((ROOT / "examples" / "quickstart" / f"{d['kind'].lower()}.yaml").read_text())
        annotations = d["metadata"].pop("annotations")
        assert list(annotations) == [WAVE]
        assert d == quickstart


def test_pipeline_is_accepted_by_the_api_server(cluster: ControlPlane, crds, pipeline: list[dict]):
    ns = _ns(cluster, "gitops-pipeline")
    rendered = "\n---\n".join(yaml.safe_dump(d) for d in pipeline)
    r = cluster.kubectl("apply", "--server-side", "--validate=strict", "-n", ns, "-f", "-", input=rendered)
    assert r.stdout.count("serverside-applied") == 5, r.stdout
    live = json.loads(cluster.kubectl("get", "fmforge", "-n", ns, "-o", "json").stdout)["items"]
    assert {(o["kind"], o["metadata"]["annotations"][WAVE]) for o in live} == {
        (d["kind"], d["metadata"]["annotations"][WAVE]) for d in pipeline}


def test_node_quickstart_overlay_moves_the_data_and_shrinks_the_resources(cluster: ControlPlane, crds,
                                                                         pipeline: list[dict], tmp_path):
    """examples/quickstart/node: the pipeline in the work namespace of the node, its file:// data
    on the claim, Ray clusters of one 1-CPU worker, the Deployment on the fmforge runtime; valid
    for fmforge and accepted by the API server."""
    from fmforge.api.manifests import load

    node = {(d["kind"], d["metadata"]["name"]): d
            for d in _docs(cluster.kubectl("kustomize", str(ROOT / "examples" / "quickstart" / "node")).stdout)}
    base = {(d["kind"], d["metadata"]["name"]): d for d in pipeline}
    assert set(node) == set(base)
    uris = []
    for key, d in node.items():
        assert d["metadata"]["namespace"] == "fmforge-work"
        if "resources" in d["spec"] and key[0] != "Deployment":
            assert d["spec"]["resources"]["cpusPerWorker"] == 1 and d["spec"]["resources"]["workers"] == 1, key
        text = json.dumps(d["spec"])
        assert "file://" not in text, key
        uris += [u for u in text.split('"') if u.startswith("pvc://")]
    assert uris and all(u.startswith("pvc://fmforge-data/") for u in uris), uris
    ks = node[("Deployment", "pydocs-qa")]["spec"]["kserve"]
    assert ks["runtime"] == "fmforge" and ks["expose"] == "none"
    for key, d in node.items():  # the sync waves kept
        assert d["metadata"]["annotations"] == base[key]["metadata"]["annotations"]
    path = tmp_path / "node.yaml"
    path.write_text("\n---\n".join(yaml.safe_dump(d) for d in node.values()))
    r = load([path])
    assert r.errors == [] and len(r.manifests) == 5, r.errors
    cluster.kubectl("create", "namespace", "fmforge-work", check=False)
    r = cluster.kubectl("apply", "--server-side", "--validate=strict", "--dry-run=server", "-f", "-",
                        input="\n---\n".join(yaml.safe_dump(d) for d in node.values()))
    assert r.stdout.count("serverside-applied") == 5, r.stdout


def test_applications_are_accepted_with_every_field_kept(cluster: ControlPlane, application_crd: str):
    if application_crd == "stand-in":
        unavailable("a stand-in Application CRD accepts anything; it proves nothing")
    ns = _ns(cluster, "argocd")
    for path in sorted(APPS.glob("*.yaml")):
        app = yaml.safe_load(path.read_text())
        app["metadata"]["namespace"] = ns
        r = cluster.kubectl("apply", "--server-side", "--validate=strict", "-f", "-", input=json.dumps(app),
                            check=False)
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
        live = json.loads(cluster.kubectl("get", "applications.argoproj.io", app["metadata"]["name"], "-n", ns,
                                          "-o", "json").stdout)
        # A structural schema prunes what it does not know; what was written must all be there.
        assert live["spec"] == app["spec"], path.name
    # and the real schema rejects a misspelt field
    bad = yaml.safe_load((APPS / "quickstart-pipeline.yaml").read_text())
    bad["metadata"]["namespace"] = ns
    bad["spec"]["ignoreDifference"] = bad["spec"].pop("ignoreDifferences")
    r = cluster.kubectl("apply", "--server-side", "--validate=strict", "-f", "-", input=json.dumps(bad), check=False)
    assert r.returncode != 0 and "ignoreDifference" in r.stderr


def test_pipeline_application_points_at_the_base():
    app = yaml.safe_load((APPS / "quickstart-pipeline.yaml").read_text())
    assert (ROOT / app["spec"]["source"]["path"] / "kustomization.yaml").is_file()
    ignored = {(i["group"], i["kind"]) for i in app["spec"]["ignoreDifferences"] if i["jsonPointers"] == ["/status"]}
    assert ignored == {("fmforge.io", k) for k in KINDS}


@pytest.fixture(scope="module")
def operator_app_rendered() -> list[dict]:
    """charts/fmforge rendered as Argo CD renders the operator Application's Helm source."""
    app = yaml.safe_load((APPS / "fmforge-operator.yaml").read_text())
    src, dest = app["spec"]["source"], app["spec"]["destination"]
    helm = build("helm") / "helm"
    r = subprocess.run([str(helm), "template", src["helm"]["releaseName"], str(ROOT / src["path"]),
                        "--namespace", dest["namespace"], "--include-crds", "--values", "-"],
                       input=yaml.safe_dump(src["helm"]["valuesObject"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return _docs(r.stdout)


def test_operator_application_renders_and_is_accepted(cluster: ControlPlane, crds, operator_app_rendered):
    kinds = [d["kind"] for d in operator_app_rendered]
    assert kinds.count("CustomResourceDefinition") == 5 and "Deployment" in kinds
    cluster.kubectl("create", "namespace", "fmforge-system", check=False)
    rendered = "\n---\n".join(yaml.safe_dump(d) for d in operator_app_rendered)
    r = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-", input=rendered)
    assert "configmap/fmforge-argocd-health serverside-applied" in r.stdout, r.stdout


def test_health_snippet_merges_into_argocd_cm(cluster: ControlPlane, operator_app_rendered):
    """The README's two commands: argocd-cm gains the five keys and keeps its own."""
    argocd, fmforge = _ns(cluster, "argocd"), _ns(cluster, "fmforge")
    existing = {"url": "https://argocd.example.com", "resource.customizations.health.ray.io_RayJob": "return {}"}
    cluster.kubectl("create", "configmap", "argocd-cm", "-n", argocd,
                    *[f"--from-literal={k}={v}" for k, v in existing.items()])
    [snippet] = [d for d in operator_app_rendered if d["metadata"]["name"] == "fmforge-argocd-health"]
    snippet["metadata"]["namespace"] = fmforge
    cluster.kubectl("apply", "-f", "-", input=json.dumps(snippet))
    data = cluster.kubectl("-n", fmforge, "get", "configmap", "fmforge-argocd-health", "-o", "jsonpath={.data}").stdout
    cluster.kubectl("-n", argocd, "patch", "configmap", "argocd-cm", "--type", "merge",
                    "--patch", f'{{"data": {data}}}')
    merged = json.loads(cluster.kubectl("-n", argocd, "get", "configmap", "argocd-cm", "-o", "json").stdout)["data"]
    assert merged == existing | {f"resource.customizations.health.fmforge.io_{k}": script(k) for k in KINDS}
