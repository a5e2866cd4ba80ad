"""The cluster tier: one real control plane for the session, with every CRD installed.

Skipped with a reason on a machine without Go; never skipped in CI (CI=true), where a build or
start failure fails the run. A failing test gets the tail of each component's log attached.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from controlplane import (  # noqa: E402
    KSERVE_MODULE,
    KSERVE_VERSIONS,
    KUBERAY_MODULE,
    KUBERAY_VERSION,
    ROOT,
    ControlPlane,
    kserve_crds,
    kuberay_crds,
)
from tools import standin_note, unavailable  # noqa: E402

STANDIN_NOTE: list[str] = []


@pytest.fixture(scope="session")
def cluster():
    if shutil.which("go") is None:
        unavailable("Go is not installed: the cluster tier builds etcd and kube-apiserver from the Go module proxy")
    cp = ControlPlane()
    try:
        cp.start()
    except Exception as e:  # noqa: BLE001
        logs = cp.logs()
        cp.stop()
        unavailable(f"the control plane did not start: {e}\n{logs}")
    print(f"\nControl plane up at {cp.url}: build/cache {cp.timings['build']:.1f}s, start {cp.timings['start']:.1f}s")
    yield cp
    cp.stop()


def _standin(group: str, kind: str, plural: str) -> str:
    """A minimal stand-in CRD, used only when the real one's Go module is not served (never in CI)."""
    return f"""apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.{group}, labels: {{fmforge.io/stand-in: "true"}}}}
spec:
  group: {group}
  names: {{kind: {kind}, plural: {plural}, singular: {kind.lower()}, listKind: {kind}List}}
  scope: Namespaced
  versions:
    - name: {"v1" if group == "ray.io" else "v1beta1"}
      served: true
      storage: true
      subresources: {{status: {{}}}}
      schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"""


@pytest.fixture(scope="session")
def crds(cluster: ControlPlane) -> dict[str, str]:
    """Install fmforge's CRDs and the real KubeRay and KServe ones; return where each came from."""
    origin: dict[str, str] = {}
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    origin["fmforge.io"] = "crds/"
    try:
        files = kuberay_crds()
        for f in files:
            cluster.kubectl("apply", "--server-side", "-f", str(f))
        origin["ray.io"] = f"{files[0].parent} (real)"
    except RuntimeError as e:
        STANDIN_NOTE.append(standin_note("KubeRay CRDs", KUBERAY_MODULE, KUBERAY_VERSION, e))
        for kind, plural in (("RayJob", "rayjobs"), ("RayCluster", "rayclusters")):
            cluster.kubectl("apply", "--server-side", "-f", "-", input=_standin("ray.io", kind, plural))
        origin["ray.io"] = "stand-in"
    try:
        version, files = kserve_crds()
        for f in files:
            cluster.kubectl("apply", "--server-side", "-f", str(f))
        origin["serving.kserve.io"] = f"kserve {version} (real)"
    except RuntimeError as e:
        STANDIN_NOTE.append(standin_note("KServe CRDs", KSERVE_MODULE, " or ".join(KSERVE_VERSIONS), e))
        cluster.kubectl("apply", "--server-side", "-f", "-",
                        input=_standin("serving.kserve.io", "InferenceService", "inferenceservices"))
        origin["serving.kserve.io"] = "stand-in"
    _wait_established(cluster)
    # Discovery of new CRDs takes a moment after Established; kubectl caches it per kubeconfig.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = cluster.kubectl("api-resources", "--categories=fmforge", "-o", "name", check=False)
        if r.returncode == 0 and len(r.stdout.split()) == 5:
            break
        time.sleep(0.5)
    for note in STANDIN_NOTE:
        print(f"\nWARNING: {note}")
    return origin


def _wait_established(cluster: ControlPlane, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending: list[str] = []
    while time.monotonic() < deadline:
        items = json.loads(cluster.kubectl("get", "crd", "-o", "json").stdout)["items"]
        pending = [c["metadata"]["name"] for c in items
                   if not any(k["type"] == "Established" and k["status"] == "True"
                              for k in (c.get("status") or {}).get("conditions") or [])]
        if not pending:
            return
        time.sleep(0.3)
    raise RuntimeError(f"CRDs not Established after {timeout}s: {pending}")


def pytest_terminal_summary(terminalreporter):
    for note in STANDIN_NOTE:
        terminalreporter.write_line(f"WARNING: {note}", yellow=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cp = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(cp, ControlPlane):
        report.sections.append(("control plane logs", cp.logs()))
    op = item.funcargs.get("operator") if hasattr(item, "funcargs") else None
    if report.failed and hasattr(op, "tail"):
        report.sections.append(("operator log", op.tail(100)))


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, crds, tmp_path_factory):
    """`fmforge operator` as a process of its own against the control plane, for one test module."""
    from operatorproc import OperatorProcess

    cfg = tmp_path_factory.mktemp("operator") / "config.yaml"
    cfg.write_text("runtimeImage: example.com/fmforge/runtime:test\nresyncSeconds: 30\n"
                   "jobs: {ttlSecondsAfterFinished: 600, activeDeadlineSeconds: 7200, backoffLimit: 1}\n")
    op = OperatorProcess(cluster, config=cfg).start()
    yield op
    op.stop()
