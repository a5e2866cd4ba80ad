"""The fmforge operator run for real, as `fmforge operator`, against the test control plane, and
the helpers the tests drive it with (apply, wait, play the KubeRay/KServe controllers' part).

A child process logged in as the chart's ServiceAccount with the chart's RBAC (`chart_kubeconfig`),
free ports for /metrics and /healthz, and
its log in the control plane's directory. Tests kill it (SIGKILL, as a node failure would) and
start it again; the process group is its own, so stopping ends exactly what was started here.
Used by tests/cluster/test_operator*.py and tests/bench/bench_operator.py.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from badmanifests import BASE
from controlplane import ROOT, ControlPlane, free_port

#: Where the chart's ServiceAccount and RBAC are installed for the operator processes.
RELEASE_NS = "fmforge-system"


def chart_kubeconfig(cluster: ControlPlane) -> Path:
    """A kubeconfig that logs in as the chart's ServiceAccount, with the chart's own RBAC (its
    ClusterRole and binding, rendered by helm and applied once per control plane): the operator
    processes here hold exactly the permissions an installed operator holds, so a verb the
    chart forgot fails here (403) as it would on a cluster, not only on the node tier."""
    path = cluster.workdir / "operator-kubeconfig"
    if path.exists():
        return path
    import yaml
    from tools import build

    helm = build("helm") / "helm"
    rendered = subprocess.run([str(helm), "template", "fmforge", str(ROOT / "charts" / "fmforge"), "--namespace",
                               RELEASE_NS, "--show-only", "templates/serviceaccount.yaml", "--show-only",
                               "templates/rbac.yaml"], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    [sa] = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    cluster.kubectl("create", "namespace", RELEASE_NS, check=False)
    cluster.kubectl("apply", "-n", RELEASE_NS, "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    tmp = token_kubeconfig(cluster, sa, RELEASE_NS, path.with_suffix(".tmp"))
    tmp.replace(path)
    return path


def token_kubeconfig(cluster: ControlPlane, sa: str, namespace: str, path: Path) -> Path:
    """A kubeconfig at `path` with nothing but a token of ServiceAccount `namespace/sa`."""
    import yaml

    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=48h").stdout.strip()
    cfg = yaml.safe_load(cluster.kubeconfig.read_text())
    cfg["users"] = [{"name": sa, "user": {"token": token}}]
    cfg["contexts"][0]["context"]["user"] = sa
    path.write_text(yaml.safe_dump(cfg))
    return path


KINDS = {"DataPile": "datapiles", "TrainingRun": "trainingruns", "ModelCard": "modelcards",
         "TunedModel": "tunedmodels", "Deployment": "deployments.fmforge.io"}
STAGE = {"DataPile": "prepare", "TrainingRun": "train", "ModelCard": "eval", "TunedModel": "tune"}


class OperatorProcess:
    """`fmforge operator` as a subprocess."""

    def __init__(self, cluster: ControlPlane, config: Path | None = None, extra_env: dict[str, str] | None = None,
                 name: str = "operator", args: list[str] | None = None, kubeconfig: Path | None = None):
        self.cluster = cluster
        self.kubeconfig = kubeconfig or chart_kubeconfig(cluster)
        self.config = config
        self.extra_env = extra_env or {}
        self.name = name
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.cluster.workdir / f"{self.name}.log"

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "PYTHONPATH": str(ROOT / "operator" / "src"), "FMFORGE_METRICS_PORT": str(self.metrics_port),
               "FMFORGE_HEALTH_PORT": str(self.health_port), **self.extra_env}
        if self.config:
            env["FMFORGE_CONFIG"] = str(self.config)
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fmforge.cli", "operator", *self.args], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.cluster.workdir)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the operator was not healthy after {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


# -- driving it -------------------------------------------------------------------------------------


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


def wait_events(cluster: ControlPlane, namespace: str, name: str, *reasons: str,
                timeout: float = 60.0) -> list[dict[str, Any]]:
    """The Events of `name` once every one of `reasons` is among them. The operator posts an
    Event after the status write it goes with (a task of its own), so a test that has just seen
    the phase may list the Events before the one it looks for has landed."""
    def have() -> list[dict[str, Any]] | None:
        evs = events(cluster, namespace, name)
        return evs if set(reasons) <= {e["reason"] for e in evs} else None
    return wait_for(f"the Events {', '.join(reasons)} of {name}", have, timeout=timeout)


def stage_outcome(cluster: ControlPlane, namespace: str, kind: str, name: str, gen: int = 1,
                  verdict: str = "Succeeded", results: dict[str, Any] | None = None) -> None:
    """Play the stage's last write from its pod (`fmforge.runtime.job.execute`): its results and
    its outcome, in one status write."""
    said = {"outcome": {"generation": gen, "verdict": verdict, "message": f"{kind} stage: {verdict}"}}
    cluster.kubectl("patch", KINDS[kind], name, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {**(results or {}), **said}}))


def succeed(cluster: ControlPlane, namespace: str, kind: str, name: str, gen: int = 1,
            results: dict[str, Any] | None = None) -> None:
    """Play a whole successful attempt: the stage writes its results and its outcome (as
    `fmforge.runtime.job` does from the pod), KubeRay reports the job done."""
    job = f"{name}-g{gen}-{STAGE[kind]}"
    wait_for(f"RayJob {job}", lambda: get(cluster, namespace, "rayjobs", job))
    stage_outcome(cluster, namespace, kind, name, gen, results=results)
    rayjob_status(cluster, namespace, job, "Complete", "SUCCEEDED")
    wait_phase(cluster, namespace, kind, name, "Succeeded")


PILE_RESULTS = {"version": {"snapshotId": "123", "digest": "sha256:pile"}, "tags": ["v1"]}
MODEL_RESULTS = {"model": {"uri": "pvc://fmforge-artifacts/models/m", "digest": "sha256:model1"}}
