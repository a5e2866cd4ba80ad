"""fmforge's RayJobs on real pods: the operator (the chart's pod) makes them, KubeRay's operator
(a pod) makes their Ray clusters, kubelet and containerd run the head, worker and submitter pods
from the repository's own runtime image under Pod Security `restricted` with an arbitrary UID, and
the stage in the pod writes its own status. Nothing here plays a controller's part.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from node import OPERATOR_IMAGE
from platform_ import CLAIM, RELEASE_NS, UID, WORK_NS, Platform

from fmforge.stages.artifacts import TRAINING_LOG
from fmforge.stages.raytrain import RUN_RECORD

API = "fmforge.io/v1alpha1"
# 4Gi: the head runs the driver and Ray Train's controller; at 2Gi Ray's memory monitor kills them.
SMALL_RAY = {"workers": 1, "cpusPerWorker": 1, "memory": "4Gi"}


def pile(name: str, **spec) -> dict:
    base = {
        "sources": [{"name": "python-docs", "uri": f"pvc://{CLAIM}/corpus/prose/", "format": "jsonl",
                     "textField": "text", "license": "PSF-2.0"},
                    {"name": "python-code", "uri": f"pvc://{CLAIM}/corpus/code/", "format": "code",
                     "include": ["*.py"], "license": "PSF-2.0"}],
        "filters": [{"type": "length", "minWords": 5}],
        "dedup": {"exact": True},
        "tokenizer": {"train": {"type": "bpe", "vocabSize": 512}},
        "tokenize": {"sequenceLength": 64},
        "publish": {"tags": ["v1"]},
        "resources": SMALL_RAY,
    }
    return {"apiVersion": API, "kind": "DataPile", "metadata": {"name": name, "namespace": WORK_NS},
            "spec": {**base, **spec}}


def training(name: str, pile_name: str, **spec) -> dict:
    base = {
        "dataPileRef": {"name": pile_name, "tag": "v1"},
        "model": {"architecture": "decoder", "family": "llama", "preset": "tiny",
                  "config": {"layers": 2, "hidden": 64, "heads": 4, "contextLength": 64}},
        "training": {"maxSteps": 30, "globalBatchSize": 8, "microBatchSize": 8, "learningRate": 3.0e-3,
                     "warmupSteps": 2, "seed": 42, "checkpointEvery": 10},
        "resources": SMALL_RAY,
        "faultTolerance": {"maxFailures": 2},
    }
    return {"apiVersion": API, "kind": "TrainingRun", "metadata": {"name": name, "namespace": WORK_NS},
            "spec": {**base, **spec}}


def apply(p: Platform, *docs: dict) -> None:
    p.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def get(p: Platform, resource: str, name: str) -> dict | None:
    r = p.kubectl("get", resource, name, "-n", WORK_NS, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def pods(p: Platform, selector: str) -> list[dict]:
    return json.loads(p.kubectl("get", "pods", "-n", WORK_NS, "-l", selector, "-o", "json").stdout)["items"]


class Watch:
    """Polls an object until it ends, keeping what was seen on the way: the phases, the
    progress the stage wrote, and every pod of its RayJob."""

    def __init__(self, p: Platform, resource: str, name: str):
        self.p, self.resource, self.name = p, resource, name
        self.phases: list[str] = []
        self.progress: list[dict] = []
        self.pods: dict[str, dict] = {}

    def poll(self) -> dict:
        obj = get(self.p, self.resource, self.name) or {}
        st = obj.get("status") or {}
        if st.get("phase") and (not self.phases or self.phases[-1] != st["phase"]):
            self.phases.append(st["phase"])
        if st.get("progress") and (not self.progress or self.progress[-1] != st["progress"]):
            self.progress.append(st["progress"])
        for pod in ray_pods(self.p, st["rayJob"]) if st.get("rayJob") else []:
            self.pods[pod["metadata"]["name"]] = pod
        return st

    def until(self, phases: set[str], timeout: float = 900, every: float = 2.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.poll()
            if st.get("phase") in phases:
                return st
            time.sleep(every)
        raise AssertionError(f"{self.resource}/{self.name} not {phases} after {timeout}s; phases {self.phases}; "
                             f"status {json.dumps(self.poll(), indent=1)[-3000:]}")


def ray_pods(p: Platform, rayjob: str) -> list[dict]:
    """The pods of a RayJob: its Ray cluster's head and workers, and its submitter Job's pod."""
    cluster = ((get(p, "rayjob", rayjob) or {}).get("status") or {}).get("rayClusterName")
    return (pods(p, f"ray.io/cluster={cluster}") if cluster else []) + pods(p, f"batch.kubernetes.io/job-name={rayjob}")


def lineage(p: Platform, obj: str) -> list[str]:
    """`fmforge lineage OBJ --cluster` run from the host as a person would, with the node's kubeconfig:
    the chain read from the statuses the stages and the operator wrote in the pods."""
    r = subprocess.run([sys.executable, "-m", "fmforge.cli", "lineage", obj, "--cluster", "-n", WORK_NS,
                        "--kubeconfig", str(p.node.kubeconfig)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def assert_restricted_and_arbitrary_uid(pod: dict) -> None:
    sc = pod["spec"]["securityContext"]
    assert sc["runAsUser"] == UID and sc["runAsNonRoot"] is True, sc
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["spec"]["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert "runAsUser" not in c["securityContext"]


def test_a_datapile_then_a_trainingrun_run_as_rayjobs_on_real_pods(platform: Platform):
    p = platform
    t0 = time.monotonic()
    apply(p, pile("docs"))
    w = Watch(p, "datapile", "docs")
    st = w.until({"Succeeded", "Failed"})
    took_pile = time.monotonic() - t0
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert st["rayJob"] == "docs-g1-prepare"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert st["outcome"]["generation"] == 1 and st["outcome"]["verdict"] == "Succeeded"
    kinds = {pod["metadata"]["labels"].get("ray.io/node-type") for pod in w.pods.values()}
    assert {"head", "worker"} <= kinds, sorted(w.pods)
    for pod in w.pods.values():
        assert_restricted_and_arbitrary_uid(pod)
    # the operator itself: the chart's pod, from the operator image, under the same rules
    [op] = json.loads(p.kubectl("get", "pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/name=fmforge",
                                "-o", "json").stdout)["items"]
    assert op["spec"]["containers"][0]["image"] == OPERATOR_IMAGE and op["status"]["phase"] == "Running"
    assert_restricted_and_arbitrary_uid(op)
    # the version, read from the host through the volume: the pile's Parquet files and its card,
    # written by the pods as UID 1000870000, group 0
    kept = st["stats"]["documents"]["kept"]
    assert kept > 0
    pv: Path = p.pv_dir
    docs_files = [f for f in (pv / "warehouse").rglob("*.parquet") if "documents" in str(f)]
    assert docs_files, sorted(str(f) for f in (pv / "warehouse").rglob("*"))[:20]
    assert sum(pq.read_metadata(f).num_rows for f in docs_files) >= kept
    cards = list((pv / "artifacts").rglob("datacard.json"))
    assert cards, sorted(str(f) for f in (pv / "artifacts").rglob("*"))[:20]
    assert (cards[0].stat().st_uid, cards[0].stat().st_gid) == (UID, 0)

    t1 = time.monotonic()
    apply(p, training("gpt", "docs"))
    w = Watch(p, "trainingrun", "gpt")
    st = w.until({"Succeeded", "Failed"}, every=1.0)
    took_train = time.monotonic() - t1
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    # progress written by the stage from its pod while the job ran
    steps = [x.get("step") for x in w.progress if x.get("step") is not None]
    assert len(set(steps)) >= 2 and steps == sorted(steps), w.progress
    assert w.phases.index("Running") < w.phases.index("Succeeded"), w.phases
    # the model, on the claim (mounted at /mnt/pvc/CLAIM in the pods), read from the host
    assert st["model"]["uri"].startswith(f"file:///mnt/pvc/{CLAIM}/"), st["model"]
    model_dir = pv / st["model"]["uri"].removeprefix(f"file:///mnt/pvc/{CLAIM}/")
    assert model_dir.is_dir() and any(model_dir.iterdir())
    # the lineage, model -> pile version -> sources with their digests, from the statuses alone
    pile_st = get(p, "datapile", "docs")["status"]
    assert st["dataPile"]["snapshotId"] == pile_st["version"]["snapshotId"], (st["dataPile"], pile_st["version"])
    chain = lineage(p, "TrainingRun/gpt")
    assert chain[0].startswith("TrainingRun/gpt: Succeeded") and \
        f"trained on docs snapshot {pile_st['version']['snapshotId']}" in chain[0], chain
    assert chain[1].startswith("  └─ DataPile/docs: Succeeded"), chain
    assert [c.strip() for c in chain[2:]] == [f"└─ source {s['name']}: {s['uri']} {s['digest']}"
                                              for s in pile_st["sources"]], (chain, pile_st["sources"])
    assert [s["name"] for s in pile_st["sources"]] == ["python-docs", "python-code"], pile_st["sources"]
    assert all(s["digest"].startswith("sha256:") for s in pile_st["sources"]), pile_st["sources"]
    print(f"\nDataPile on the node {took_pile:.0f}s, TrainingRun {took_train:.0f}s; progress seen: {steps}")
    print("\n".join(chain))


def test_a_stage_that_fails_in_its_pod_says_why(platform: Platform):
    p = platform
    bad = pile("empty", sources=[{"name": "nothing", "uri": f"pvc://{CLAIM}/corpus/no-such-folder/",
                                  "format": "jsonl"}])
    apply(p, bad)
    w = Watch(p, "datapile", "empty")
    st = w.until({"Succeeded", "Failed"})
    assert st["phase"] == "Failed", json.dumps(st, indent=1)
    # the stage's own words, not "the job failed"
    assert st["outcome"]["verdict"] == "Failed" and st["outcome"]["reason"] != "StageFailed", st["outcome"]
    assert "no-such-folder" in st["message"], st["message"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "no-such-folder" in ready["message"]
    events = json.loads(p.kubectl("get", "events", "-n", WORK_NS, "-o", "json",
                                  "--field-selector=involvedObject.name=empty").stdout)["items"]
    assert any(e["type"] == "Warning" and "no-such-folder" in e["message"] for e in events), \
        [(e["reason"], e["message"]) for e in events]


def running_ray_pod(p: Platform, name: str) -> Watch:
    """A Watch of DataPile `name`, once a Ray pod of its generation 1 RayJob runs."""
    w = Watch(p, "datapile", name)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        w.poll()
        if any(pod["status"].get("phase") == "Running" for pod in ray_pods(p, f"{name}-g1-prepare")):
            return w
        time.sleep(1)
    pytest.fail(f"no Ray pod ran for {name}-g1-prepare; phases {w.phases}")


def test_deleting_the_object_removes_its_rayjob_raycluster_and_pods(platform: Platform):
    p = platform
    apply(p, pile("gone", publish={"tags": ["gone"]}))
    running_ray_pod(p, "gone")
    rj = get(p, "rayjob", "gone-g1-prepare")
    cluster = rj["status"]["rayClusterName"]
    assert get(p, "raycluster", cluster) is not None
    p.kubectl("delete", "datapile", "gone", "-n", WORK_NS, "--wait=true", "--timeout=120s")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        left = (get(p, "rayjob", "gone-g1-prepare"), get(p, "raycluster", cluster), ray_pods(p, "gone-g1-prepare"))
        if not any(left):
            break
        time.sleep(1)
    else:
        pytest.fail(f"left after the delete: {left!r:.2000}")


@pytest.mark.extended
def test_a_worker_pod_deleted_mid_training_is_replaced_and_the_run_resumes(platform: Platform):
    """The Ray worker's pod deleted while it trains (as a node drain or an eviction would):
    KubeRay starts another, Ray Train restarts the worker group from the newest checkpoint
    (faultTolerance.maxFailures), and the model's training log shows the resume."""
    p = platform
    apply(p, pile("kpile", publish={"tags": ["v1"]}))
    st = Watch(p, "datapile", "kpile").until({"Succeeded", "Failed"})
    assert st["phase"] == "Succeeded", st.get("message")
    # long enough to be caught in the middle: the tiny model does tens of steps a second
    run = training("killed", "kpile", model={"architecture": "decoder", "family": "llama", "preset": "tiny",
                                            "config": {"layers": 4, "hidden": 128, "heads": 4, "contextLength": 64}})
    run["spec"]["training"].update(maxSteps=1500, checkpointEvery=100)
    apply(p, run)
    w = Watch(p, "trainingrun", "killed")
    deadline = time.monotonic() + 900
    victim = None
    while time.monotonic() < deadline:
        st = (get(p, "trainingrun", "killed") or {}).get("status") or {}
        assert st.get("phase") not in ("Succeeded", "Failed"), f"ended before the kill: {st.get('message')}"
        step = (st.get("progress") or {}).get("step") or 0
        if 200 <= step < 1200:
            [victim] = [pod for pod in ray_pods(p, st["rayJob"])
                        if pod["metadata"]["labels"].get("ray.io/node-type") == "worker"]
            p.kubectl("delete", "pod", victim["metadata"]["name"], "-n", WORK_NS, "--wait=false")
            print(f"\ndeleted {victim['metadata']['name']} at step {step}")
            break
        time.sleep(1)
    assert victim, f"training never reached step 200; last status {st}"
    st = w.until({"Succeeded", "Failed"}, every=1.0)
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)[-3000:]
    workers = {name for name, pod in w.pods.items() if pod["metadata"]["labels"].get("ray.io/node-type") == "worker"}
    assert len(workers) >= 2, f"no new worker pod: {sorted(w.pods)}"
    model_dir = p.pv_dir / st["model"]["uri"].removeprefix(f"file:///mnt/pvc/{CLAIM}/")
    assert (model_dir / TRAINING_LOG).is_file()
    # Restarts and the step resumed from differ between runs that make the same model, so they
    # are in the attempt's run record beside its checkpoints, not in the model's training log.
    [record] = [json.loads(f.read_text()) for f in (p.pv_dir / "artifacts").rglob(RUN_RECORD)
                if "/trainingrun/killed/" in str(f)]
    assert record["restarts"] >= 1 and (record["resumedFromStep"] or 0) >= 100, \
        {k: record.get(k) for k in ("restarts", "resumedFromStep")}
    assert st["progress"]["resumedFromStep"] == record["resumedFromStep"], st["progress"]
    print(f"\nworker {victim['metadata']['name']} deleted; resumed from step {record['resumedFromStep']}, "
          f"{record['restarts']} restart(s); progress seen {[x.get('step') for x in w.progress]}")


@pytest.mark.extended
def test_a_spec_change_starts_a_new_generations_rayjob_and_stops_the_old_ones_pods(platform: Platform):
    """A spec changed while generation 1 runs: the operator starts generation 2's RayJob and stops
    generation 1's (its RayJob, Ray cluster and pods go), and the object ends with generation 2's
    outcome."""
    p = platform
    apply(p, pile("regen", publish={"tags": ["regen"]}))
    w = running_ray_pod(p, "regen")
    old_cluster = get(p, "rayjob", "regen-g1-prepare")["status"]["rayClusterName"]
    old_pods = {pod["metadata"]["name"] for pod in ray_pods(p, "regen-g1-prepare")}
    changed = pile("regen", publish={"tags": ["regen"]}, filters=[{"type": "length", "minWords": 6}])
    apply(p, changed)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        w.poll()
        left = (get(p, "rayjob", "regen-g1-prepare"), get(p, "raycluster", old_cluster),
                [q for q in pods(p, "ray.io/node-type") if q["metadata"]["name"] in old_pods])
        if get(p, "rayjob", "regen-g2-prepare") and not any(left):
            break
        time.sleep(1)
    else:
        pytest.fail(f"generation 1 left {left!r:.1500}; generation 2's RayJob: "
                    f"{get(p, 'rayjob', 'regen-g2-prepare') is not None}")
    st = w.until({"Succeeded", "Failed"})
    assert st["phase"] == "Succeeded" and st["outcome"]["generation"] == 2, json.dumps(st, indent=1)[-2000:]
    assert st["rayJob"] == "regen-g2-prepare"
