"""Benchmark of the quickstart's DataPile on the real node against `fmforge run` of the same
manifest on the host, same corpus, same Ray resources, one run each.

    python tests/bench/bench_node.py [--corpus-files N]      (make bench-node; root)

Starts the node (tests/node/node.py, building what is missing) with the chart installed and the
corpus on the claim, applies the DataPile of examples/quickstart/node (the quickstart's manifest
with its data on the claim and one 1-CPU Ray worker), and times what happens, from the objects'
own timestamps and the pods' conditions:

  operator      apply -> the operator's RayJob exists
  ray cluster   RayJob -> its head and worker pods Ready (KubeRay creates them; kubelet starts the
                runtime image; Ray starts in the pods and passes KubeRay's probes)
  submitter     Ray cluster Ready -> the submitter pod's container started (KubeRay's Job)
  stage         submitter started -> the RayJob's Ray job ended (the stage itself, plus its
                `ray job submit` and the driver's imports)
  status        Ray job ended -> the DataPile `Succeeded` (the operator sees the verdict)

then stops the node and runs `fmforge run` on a copy of the same corpus on the host, and prints both wall times and
the difference, as a table and one JSON line. The node's start (cold or warm) is printed too.
Never part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "node"))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import node as N  # noqa: E402
import platform_ as P  # noqa: E402

PILE = "pydocs"


def ts(value: str | None) -> float | None:
    """An API timestamp (RFC 3339) as epoch seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def condition_time(pod: dict, kind: str) -> float | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c["type"] == kind and c["status"] == "True":
            return ts(c.get("lastTransitionTime"))
    return None


def started(pod: dict) -> float | None:
    states = [(s.get("state") or {}).get("running") or (s.get("state") or {}).get("terminated") or {}
              for s in (pod.get("status") or {}).get("containerStatuses") or []]
    times = [ts(s["startedAt"]) for s in states if s.get("startedAt")]
    return min(times) if times else None


def node_pile(plat: P.Platform) -> dict:
    """The DataPile of examples/quickstart/node, as `kubectl kustomize` renders it."""
    out = plat.kubectl("kustomize", str(ROOT / "examples" / "quickstart" / "node")).stdout
    [doc] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DataPile" and d["metadata"]["name"] == PILE]
    return doc


def on_node(plat: P.Platform, doc: dict, timeout: float = 1800) -> dict:
    """Apply `doc`, wait for it to end, and return the timestamps of what happened."""
    kube = plat.kubectl
    t_apply = time.time()
    kube("apply", "-f", "-", input=json.dumps(doc))
    pods: dict[str, dict] = {}
    #: the first Ready seen of each Ray pod: a finished job's pods go at once (ttlSecondsAfterFinished: 0)
    first_ready: dict[str, float] = {}
    rayjob: dict = {}
    deadline = time.monotonic() + timeout
    while True:
        obj = json.loads(kube("get", "datapile", PILE, "-n", P.WORK_NS, "-o", "json").stdout)
        st = obj.get("status") or {}
        if st.get("rayJob"):
            r = kube("get", "rayjob", st["rayJob"], "-n", P.WORK_NS, "-o", "json", check=False)
            if r.returncode == 0:
                rayjob = json.loads(r.stdout)
                cluster = (rayjob.get("status") or {}).get("rayClusterName")
                selectors = ([f"ray.io/cluster={cluster}"] if cluster else []) + [
                    f"batch.kubernetes.io/job-name={st['rayJob']}"]
                for sel in selectors:
                    found = kube("get", "pods", "-n", P.WORK_NS, "-l", sel, "-o", "json").stdout
                    for pod in json.loads(found)["items"]:
                        name = pod["metadata"]["name"]
                        pods[name] = pod
                        if name not in first_ready and (t := condition_time(pod, "Ready")):
                            first_ready[name] = t
        if st.get("phase") in ("Succeeded", "Failed"):
            t_end = time.time()
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"DataPile/{PILE} did not end in {timeout:.0f}s: {json.dumps(st)[-2000:]}")
        time.sleep(0.5)
    if st["phase"] != "Succeeded":
        raise SystemExit(f"DataPile/{PILE} failed on the node: {st.get('message')}")
    role = {n: p["metadata"]["labels"].get("ray.io/node-type") or "submitter" for n, p in pods.items()}
    ray_ready = [first_ready.get(n) for n in pods if role[n] in ("head", "worker")]
    sub = [p for n, p in pods.items() if role[n] == "submitter"]
    rj = rayjob.get("status") or {}
    # the Ray job's own end (KubeRay copies it from Ray's dashboard), else the RayJob's
    job_end = ts((rj.get("rayJobInfo") or {}).get("endTime")) or ts(rj.get("endTime"))
    return {
        "apply": t_apply, "end": t_end,
        "rayjob": ts(rayjob["metadata"]["creationTimestamp"]) if rayjob else None,
        "rayReady": max(t for t in ray_ready if t) if ray_ready and all(ray_ready) else None,
        "submitter": started(sub[0]) if sub else None,
        "jobEnd": job_end or None,
        "pods": {n: role[n] for n in sorted(pods)},
        "documents": st["stats"]["documents"],
    }


def on_host(corpus: Path, doc: dict) -> tuple[float, dict]:
    """`fmforge run` of the same DataPile on a copy of the claim's corpus; (seconds, its status)."""
    work = Path(tempfile.mkdtemp(prefix="fmforge-bench-node-"))
    try:
        shutil.copytree(corpus, work / "corpus")
        local = json.loads(json.dumps(doc))
        local["metadata"].pop("namespace", None)
        for src in local["spec"]["sources"]:
            src["uri"] = src["uri"].replace(f"pvc://{P.CLAIM}/corpus/", "file://corpus/")
        (work / "datapile.yaml").write_text(yaml.safe_dump(local, sort_keys=False))
        t = time.monotonic()
        r = subprocess.run([str(Path(sys.executable).parent / "fmforge"), "run", str(work), "--progress", "plain"],
                           capture_output=True, text=True)
        took = time.monotonic() - t
        if r.returncode != 0:
            raise SystemExit(f"fmforge run failed:\n{r.stderr[-3000:]}")
        g = subprocess.run([str(Path(sys.executable).parent / "fmforge"), "get", "datapile", PILE, "-o", "json",
                            "--state-dir", str(work / ".fmforge")], capture_output=True, text=True, check=True)
        return took, json.loads(g.stdout)["status"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-files", type=int, default=0,
                    help="files of each kind in the corpus (default 0: the quickstart's whole corpus)")
    args = ap.parse_args()
    t0 = time.monotonic()
    node = N.Node()
    try:
        node.start()
        plat = P.install(node, corpus_files=args.corpus_files or None)
        up = time.monotonic() - t0
        print(f"node up in {up:.0f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in {**node.timings,
                                                                             **plat.timings}.items()), flush=True)
        doc = node_pile(plat)
        n = on_node(plat, doc)
        # the same corpus, kept for the host's run, which starts once the node is gone (its
        # control plane, kubelet and controllers would share the two cores with it)
        corpus = Path(tempfile.mkdtemp(prefix="fmforge-bench-corpus-")) / "corpus"
        shutil.copytree(plat.pv_dir / "corpus", corpus)
    finally:
        node.stop()
    try:
        host_s, host_st = on_host(corpus, doc)
    finally:
        shutil.rmtree(corpus.parent, ignore_errors=True)
    node_s = n["end"] - n["apply"]
    parts = [("operator: apply -> RayJob", n["apply"], n["rayjob"]),
             ("ray cluster: RayJob -> head and worker Ready", n["rayjob"], n["rayReady"]),
             ("submitter: Ray Ready -> its container started", n["rayReady"], n["submitter"]),
             ("stage: submitter started -> Ray job ended", n["submitter"], n["jobEnd"]),
             ("status: Ray job ended -> DataPile Succeeded", n["jobEnd"], n["end"])]
    print(f"\nDataPile/{PILE} ({n['documents']['kept']}/{n['documents']['read']} documents kept; the host's run "
          f"{host_st['stats']['documents']['kept']}/{host_st['stats']['documents']['read']})")
    print(f"{'':48} {'seconds':>8}")
    for label, a, b in parts:
        print(f"  {label:46} {(b - a) if a and b else float('nan'):8.1f}")
    print(f"  {'on the node, apply -> Succeeded':46} {node_s:8.1f}")
    print(f"  {'on the host, fmforge run':46} {host_s:8.1f}")
    print(f"  {'difference':46} {node_s - host_s:8.1f}")
    print(json.dumps({"bench": "node-datapile", "nodeUpSeconds": round(up, 1), "nodeSeconds": round(node_s, 1),
                      "hostSeconds": round(host_s, 1),
                      "parts": {label.split(":")[0]: round(b - a, 1) if a and b else None for label, a, b in parts},
                      "pods": n["pods"], "documents": n["documents"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
